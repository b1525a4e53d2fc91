"""TensorBoard for searches: readable per-epoch scalars plus one HParams session per trial.

Ray Tune's built-in TensorBoard logger (``TBXLoggerCallback``) writes every reported key of every
epoch as a scalar under ``ray/tune/<key>``: 27 cards per trial, Tune's bookkeeping (``done``,
``training_iteration``, ``time_this_iter_s``, ...) among the curves users compare.
:class:`HParamsCallback` subclasses it and replaces both parts:

* **Scalars** (:func:`scalar_tag`): ``val/srcc``, ``val/plcc``, ``val/krcc``, ``val/rmse``,
  ``val/best_srcc``, ``train/loss`` and its parts (``train/l1``, ``train/rank``, ...),
  ``lr/head``, ``lr/backbone``, ``throughput/images_per_s``, ``time/epoch_s``,
  ``memory/gpu_peak_mb``, ``progress/epoch``; step = the trial's reported epoch count. Tune's
  bookkeeping is not charted (it stays in each trial's ``result.json`` / ``progress.csv``); any
  other number a trainable reports goes under ``other/``.
* **Hyperparameters.** Tune logs ``trial.evaluated_params``: the raw searched keys, so a study
  with a ``range_by`` parameter shows ``lr__unit`` (a number in [0, 1]) instead of the learning
  rate the trial trained with. Here each session gets ``study.resolve(trial.config)``: the
  resolved searched parameters (``lr``) and the study's fixed values.
* **One experiment config.** Tune (through ``tensorboardX.summary.hparams``) writes an
  experiment config per trial, listing that trial's own keys and the metrics of its *last*
  result; TensorBoard uses whichever run it reads first. When that is a trial ASHA stopped
  early, the metrics it never reported are missing from the dashboard; the list also holds Tune's
  bookkeeping (``done``, ``time_this_iter_s``, ...). Here every trial writes the same config,
  built from the study: every hyperparameter with its domain, and a fixed list of metrics.
* **Every trial, with its status.** Tune writes HParams only at the end of a trial that
  reported a result, always as ``STATUS_SUCCESS``. Here the session starts with the trial (so
  running trials are in the dashboard) and ends with ``STATUS_SUCCESS`` or ``STATUS_FAILURE``;
  a trial that errored before its first epoch still shows up with its hyperparameters.

Metric values are not copied: a session's value for a metric is the last point of its scalar
(``val/best_srcc`` for ``best_val_srcc``) in the trial's folder, i.e. what the trial last reported
(``best_val_srcc`` is a running maximum). No test metric is listed or reported: trials score
validation only, and the one trial the search selects is scored on test after the search
(``summary.json``, and its row of ``trials.parquet``), so the dashboard never invites choosing
on test.

Because the callback *is* a ``TBXLoggerCallback``, Tune does not add its default one (it only
adds loggers of types that are missing), and the CSV and JSON loggers stay as they are.

Viewing: ``iqa-ray tensorboard EXPERIMENT_DIR`` prints the command;
``--start`` runs it, bound to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from ray.tune.logger import TBXLoggerCallback

if TYPE_CHECKING:  # the study module pulls in torch; printing a command should not
    from iqa_ray.search.study import Study

logger = logging.getLogger(__name__)

# Tune's per-result bookkeeping, and our reports that are not curves: kept out of the charts.
BOOKKEEPING = frozenset({
    "done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s", "time_total_s", "pid",
    "node_ip", "node_id", "hostname", "time_since_restore", "iterations_since_restore", "timesteps_total",
    "timesteps_since_restore", "episodes_total", "checkpoint_dir_name", "should_checkpoint", "warmup_time",
    "git_revision", "resumed_from_epoch", "stopped_early", "config", "workers", "worker_pids", "latency_batch_size",
})
_NAMED_TAGS = {"best_val_srcc": "val/best_srcc", "best_epoch": "val/best_epoch", "epoch": "progress/epoch",
               "images_per_s": "throughput/images_per_s", "epoch_seconds": "time/epoch_s",
               "gpu_peak_mem_mb": "memory/gpu_peak_mb", "params_m": "cost/params_m", "gflops": "cost/gflops",
               "latency_ms": "cost/latency_ms", "latency_batch_ms": "cost/latency_batch_ms"}
_GROUPS = (("val_", "val"), ("train_", "train"), ("lr_", "lr"))
DEFAULT_HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0

# (metric, dataset type, description), in the order the dashboard lists them.
_TRAIN, _VAL, _OTHER = "train", "val", ""
METRICS: tuple[tuple[str, str, str], ...] = (
    ("best_val_srcc", _VAL, "best validation SRCC so far (the selection metric)"),
    ("val_srcc", _VAL, "validation SRCC of the last epoch"),
    ("val_plcc", _VAL, "validation PLCC of the last epoch"),
    ("val_krcc", _VAL, "validation KRCC of the last epoch"),
    ("val_rmse", _VAL, "validation RMSE of the last epoch"),
    ("best_epoch", _OTHER, "epoch of the best validation SRCC"),
    ("epoch", _OTHER, "epochs trained (fewer than the budget: stopped by the scheduler or errored)"),
    ("train_loss", _TRAIN, "training loss of the last epoch"),
    ("images_per_s", _OTHER, "training throughput of the last epoch"),
    ("params_m", _OTHER, "model parameters, millions"),
    ("gflops", _OTHER, "GFLOPs per image at the evaluation size (PyTorch's flop counter)"),
    ("latency_ms", _OTHER, "ms per image at batch 1 on the trial's device (median)"),
    ("latency_batch_ms", _OTHER, "ms per image at the evaluation batch size (capped on CPU) on the trial's device (median)"),
)

_SCALAR_TYPES = (bool, int, float, str)


# ----------------------------------------------------------------------------- summaries


def scalar_tag(key: str) -> str | None:
    """The TensorBoard tag of a reported key, or None for Tune's bookkeeping (not charted).

    >>> [scalar_tag(k) for k in ("val_srcc", "train_loss", "lr_backbone", "best_val_srcc", "done")]
    ['val/srcc', 'train/loss', 'lr/backbone', 'val/best_srcc', None]
    """
    if key in BOOKKEEPING or key.startswith("config/"):
        return None
    if key in _NAMED_TAGS:
        return _NAMED_TAGS[key]
    for prefix, group in _GROUPS:
        if key.startswith(prefix) and len(key) > len(prefix):
            return f"{group}/{key[len(prefix):]}"
    return f"other/{key}"


def metric_names(study: Study) -> list[str]:
    """The metrics the HParams dashboard lists for ``study`` (its own metric included)."""
    names = [m for m, _, _ in METRICS]
    return names if study.metric in names else [study.metric, *names]


def hparam_names(study: Study) -> list[str]:
    """Searched parameters (resolved names, e.g. ``lr``, never ``lr__unit``), then fixed keys."""
    return [p.name for p in study.params] + [k for k in study.constants() if k not in {p.name for p in study.params}]


def _hparam_value(value: Any) -> bool | int | float | str | None:
    """A value the HParams plugin can store, or None (left out of the session)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, _SCALAR_TYPES) else None


def _domain(study: Study, name: str) -> Any:
    from tensorboard.plugins.hparams import summary_v2 as hp

    by_name = {p.name: p for p in study.params}
    try:
        if name in by_name:
            p = by_name[name]
            if p.type == "choice":
                return hp.Discrete(list(p.values))
            if p.type in ("int", "logint"):
                return hp.IntInterval(int(p.low), int(p.high))
            return hp.RealInterval(float(p.low), float(p.high))  # range_by: the union of its ranges
        value = _hparam_value(study.constants()[name])
        return None if value is None else hp.Discrete([value])
    except (ValueError, TypeError):  # e.g. a choice of mixed types: list the values without a domain
        return None


def experiment_summary(study: Study) -> Any:
    """The experiment-level HParams config (``tensorboard.compat.proto`` Summary) for ``study``.

    It does not depend on the trial, so every trial folder can carry the same copy.
    """
    from tensorboard.plugins.hparams import summary_v2 as hp

    roles = study.roles or {}
    descriptions = {p.name: p.description for p in study.params}
    hparams = []
    for name in hparam_names(study):
        if name not in descriptions and _hparam_value(study.constants()[name]) is None:
            continue  # e.g. image_size = None: nothing the dashboard could show
        role = roles.get(name, "fixed")
        text = descriptions.get(name) or ""
        hparams.append(hp.HParam(name, _domain(study, name), description=f"{role}" + (f": {text}" if text else "")))
    kinds = {_TRAIN: hp.Metric.TRAINING, _VAL: hp.Metric.VALIDATION, _OTHER: None}
    info = {m: (kinds[k], d) for m, k, d in METRICS}
    metrics = [hp.Metric(scalar_tag(name), display_name=name, description=info.get(name, (None, ""))[1],
                         dataset_type=info.get(name, (None, ""))[0])
               for name in metric_names(study)]
    return hp.hparams_config_pb(hparams, metrics)


def trial_hparams(study: Study, config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The hyperparameters of a trial as the HParams plugin gets them: resolved, listed keys only."""
    try:
        resolved = study.reported_config(config)
    except Exception:  # never lose a trial's session over a config the study cannot resolve
        logger.exception("could not resolve trial config %s; logging it unresolved", dict(config))
        resolved = dict(config)
    out = {}
    for name in hparam_names(study):
        value = _hparam_value(resolved.get(name))
        if value is not None:
            out[name] = value
    return out


def session_start_summary(study: Study, trial_id: str, config: Mapping[str, Any], start_time: float) -> Any:
    from tensorboard.plugins.hparams import summary_v2 as hp

    # The trial id is the session group: every trial is its own row, even when two share values.
    return hp.hparams_pb(trial_hparams(study, config), trial_id=trial_id, start_time_secs=start_time)


def session_end_summary(failed: bool, end_time: float) -> Any:
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS,
                                          end_time_secs=end_time)
    summary = summary_pb2.Summary()
    summary.value.add(tag=metadata.SESSION_END_INFO_TAG,
                      metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=info)),
                      tensor=metadata.NULL_TENSOR)
    return summary


def _to_tbx(summary: Any) -> Any:
    """tensorboard's Summary as tensorboardX's (same schema, separate generated classes)."""
    from tensorboardX.proto import summary_pb2 as tbx_summary_pb2

    return tbx_summary_pb2.Summary.FromString(summary.SerializeToString())


# ----------------------------------------------------------------------------- the callback


class HParamsCallback(TBXLoggerCallback):
    """Tune's TensorBoard logger with HParams sessions built from the study (see the module doc).

    Pass it in ``RunConfig(callbacks=[...])``; Tune then skips its default TBX logger.
    """

    def __init__(self, study: Study):
        super().__init__()
        self._study = study
        self._experiment = None  # built lazily: the callback is pickled with the Tuner
        self._started: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_experiment=None, _started=set(), _trial_writer={}, _trial_result={})
        return state

    def log_trial_start(self, trial: Any) -> None:
        super().log_trial_start(trial)  # opens a new event file in the trial folder
        if trial.trial_id in self._started:
            return  # a restart of a trial this driver already logged: its session exists
        try:
            if self._experiment is None:
                self._experiment = _to_tbx(experiment_summary(self._study))
            writer = self._trial_writer[trial].file_writer
            writer.add_summary(self._experiment)
            writer.add_summary(_to_tbx(session_start_summary(self._study, trial.trial_id, trial.config, time.time())))
            self._trial_writer[trial].flush()
            self._started.add(trial.trial_id)
        except Exception:  # logging must never stop a search
            logger.exception("could not write the HParams session of trial %s", trial.trial_id)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        """Every finite number of ``result`` under its readable tag (:func:`scalar_tag`)."""
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        step = result.get("training_iteration", iteration)
        writer = self._trial_writer[trial]
        for key, value in result.items():
            tag = scalar_tag(key)
            if tag is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            if math.isfinite(float(value)):  # a NaN point would break the chart's scale; result.json keeps it
                writer.add_scalar(tag, float(value), global_step=step)
        self._trial_result[trial] = {}
        writer.flush()

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial not in self._trial_writer:
            # e.g. a trial that failed before it started: it still gets its row, marked failed.
            self.log_trial_start(trial)
        try:
            self._trial_writer[trial].file_writer.add_summary(_to_tbx(session_end_summary(failed, time.time())))
        except Exception:
            logger.exception("could not end the HParams session of trial %s", trial.trial_id)
        super().log_trial_end(trial, failed=failed)  # closes the writer (and calls _try_log_hparams)

    def _try_log_hparams(self, trial: Any, result: dict) -> None:
        """Tune's own HParams summary (evaluated params, per-trial experiment) is replaced above."""
        return


# ----------------------------------------------------------------------------- running TensorBoard


def tensorboard_command(experiment_dir: str | os.PathLike[str], host: str = DEFAULT_HOST,
                        port: int | None = None) -> str:
    """The shell command that serves ``experiment_dir`` on ``host`` (127.0.0.1 by default)."""
    args = ["tensorboard", "--logdir", str(experiment_dir), "--host", host]
    if port is not None:
        args += ["--port", str(port)]
    return shlex.join(args)


_URL = re.compile(r"TensorBoard \S+ at (http://\S+?)/? \(Press CTRL\+C to quit\)")


def start_tensorboard(logdir: str | os.PathLike[str], port: int = 0, *, host: str = DEFAULT_HOST,
                      timeout: float = START_TIMEOUT_S,
                      extra_args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Start a real ``tensorboard`` process on ``host:port`` and wait until it answers.

    ``port=0`` lets the operating system choose a free port (read back from TensorBoard's
    start message). Binds 127.0.0.1 unless the caller names another host. Returns the process
    and its URL (no trailing slash); stop it with :func:`stop_tensorboard`. Its output is kept
    in ``process.output`` (the last lines), which the error message quotes if it does not start.

    Raises:
        RuntimeError: it exited, or did not answer within ``timeout`` seconds (it is stopped).
    """
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host,
           "--port", str(int(port)), *extra_args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    output: collections.deque[str] = collections.deque(maxlen=200)
    found: dict[str, str] = {}
    ready = threading.Event()

    def drain() -> None:  # keep reading, or TensorBoard blocks once the pipe is full
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line.rstrip("\n"))
            match = _URL.search(line)
            if match and not ready.is_set():
                found["url"] = match.group(1).rstrip("/")
                ready.set()
        ready.set()

    threading.Thread(target=drain, name=f"tensorboard-{proc.pid}-output", daemon=True).start()
    proc.output = output  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout

    def fail(why: str) -> RuntimeError:
        stop_tensorboard(proc)
        tail = "\n".join(list(output)[-20:])
        return RuntimeError(f"tensorboard {why} (command: {shlex.join(cmd)}); its output:\n{tail}")

    if not ready.wait(max(0.0, deadline - time.monotonic())) or "url" not in found:
        raise fail("exited before serving" if proc.poll() is not None else f"did not start within {timeout:g} s")
    url = found["url"]
    while True:  # the start message comes just before it serves; make sure it answers
        try:
            with urllib.request.urlopen(url + "/data/environment", timeout=5) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None:
            raise fail(f"exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise fail(f"did not answer at {url} within {timeout:g} s")
        time.sleep(0.2)


def stop_tensorboard(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a process from :func:`start_tensorboard` (kill it if it does not exit)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    if proc.stdout is not None:
        proc.stdout.close()
