"""The search's console: a compact live trial table instead of Ray's, Ray's chatter kept in files.

By default a search prints what its user watches: a table every ``--progress-every`` seconds with
each trial's epoch, validation SRCC/PLCC (the optimised metric first), the value selection judges
it by (the metric at the epoch whose weights it keeps), current learning rate, time and searched
values, the trial the summary would select so far, one line when a trial ends, errors with the path of their traceback,
and a final table. Ray's own console output goes to files instead of the terminal:

* the driver's ``ray`` / ``ray.tune`` / ``optuna`` INFO records -> ``<experiment>/driver.log``
  (warnings and errors still reach the console as well);
* every trial worker's stdout/stderr -> Ray's session logs (``/tmp/ray/session_latest/logs``,
  ``worker-*.out`` / ``.err``), which is where they always were; they are just not echoed.

``--verbose`` brings back Ray's own console (its trial tables and the workers' echoed logs). With
either console, a trial that holds a GPU share but finds no CUDA (and so trains on the CPU) is
said once, in one line (:class:`DeviceNote`), not once per trial or epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from iqa_ray.core.selection import SelectionRule, kept_report, select_by_rule, select_trial, trial_score
from iqa_ray.search.settings import DEFAULT_PROGRESS_EVERY_S, SearchSettings

#: Loggers whose INFO records go to the driver log instead of the console.
DRIVER_LOGGERS = ("ray", "optuna", "mlflow")
NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
MAX_ROWS = 20


def console_callbacks(settings: SearchSettings) -> list[Any]:
    """The search's live trial table (none with ``--verbose``: Ray's console then) and its note on
    GPU shares without CUDA (with either console)."""
    if settings.verbose:
        return [DeviceNote()]
    study = settings.effective_study
    return [TrialProgress(study.metric, study.mode, params=[p.name for p in study.params], scheduler=settings.scheduler,
                          every=settings.progress_every, rule=study.selection_rule), DeviceNote()]


def device_note(trial_id: str, report: Mapping[str, Any]) -> str | None:
    """The line that says a trial held a GPU share but found no CUDA and trained on the CPU, from one
    of its reports (:func:`iqa_ray.trainables.placement.device_report`); ``None`` for any other trial."""
    gpu_ids, group = report.get("gpu_ids"), report.get("process_group")
    if not isinstance(gpu_ids, str) or not gpu_ids or report.get("device") != "cpu":  # (NaN: not reported)
        return None
    workers = report.get("worker_gpu_ids")  # a data-parallel trial: each rank's GPU
    held = f"GPUs {workers.replace(';', ', ')}" if isinstance(workers, str) and ";" in workers else f"GPU {gpu_ids}"
    group = f", its data-parallel workers on {group}" if isinstance(group, str) and group != "none" else ""
    return (f"note: trial {trial_id} holds {held} (CUDA_VISIBLE_DEVICES="
            f"{report.get('cuda_visible_devices') or 'unset'}) but finds no CUDA, so it trains on the CPU{group}; "
            "so does every trial placed on such a GPU (a node that declares GPUs it does not have, or a torch "
            "without CUDA). trials.parquet's device column says where each trial trained.")


class DeviceNote(Callback):
    """Tune callback that prints :func:`device_note` once per search: for the first trial that held a
    GPU share without CUDA (the others are alike; ``summary.json``'s ``devices`` lists them)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out
        self.noted: str | None = None  # the trial the note named

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        if self.noted is None and (note := device_note(trial.trial_id, result)) is not None:
            print(note, file=self.out or sys.stdout, flush=True)
            self.noted = trial.trial_id


@contextlib.contextmanager
def quiet_console(log_path: str | Path) -> Iterator[Path]:
    """Our console instead of Ray's for the duration: :func:`driver_log` to ``log_path``, and Tune's
    legacy output engine, which at ``verbose=0`` prints nothing (Ray 2.60's new engine prints an
    experiment header box at every verbosity). Restores the environment on exit."""
    saved = os.environ.get(NEW_OUTPUT_ENV)
    os.environ[NEW_OUTPUT_ENV] = "0"
    try:
        with driver_log(log_path) as path:
            yield path
    finally:
        if saved is None:
            os.environ.pop(NEW_OUTPUT_ENV, None)
        else:
            os.environ[NEW_OUTPUT_ENV] = saved


@contextlib.contextmanager
def driver_log(path: str | Path) -> Iterator[Path]:
    """Send the driver's Ray and Optuna INFO logging to ``path``; their console handlers keep
    warnings and errors only. Restores both on exit.

    The records are written to a temporary file first and appended to ``path`` on exit when its
    folder exists by then (the experiment folder, which Tune creates): a launch that fails before
    its search starts leaves no experiment folder behind, and its log stays in the temporary file
    (named in a warning on the console).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix="iqa-ray-driver-", suffix=".log")
    os.close(fd)
    tmp = Path(tmp_name)
    handler = logging.FileHandler(tmp, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"))
    saved: list[tuple[logging.Handler, int]] = []
    saved_levels: list[tuple[logging.Logger, int]] = []
    with contextlib.suppress(ImportError):  # Optuna adds its console handler on first use: make it now
        import optuna

        optuna.logging.get_logger("optuna")
    loggers = [logging.getLogger(name) for name in DRIVER_LOGGERS]
    for logger in loggers:
        for console in logger.handlers:
            if not isinstance(console, logging.FileHandler):
                saved.append((console, console.level))
                console.setLevel(max(console.level, logging.WARNING))
        saved_levels.append((logger, logger.level))
        if logger.getEffectiveLevel() > logging.INFO or logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        yield path
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        for logger, level in saved_levels:
            logger.setLevel(level)
        for console, level in saved:
            console.setLevel(level)
        handler.close()
        _keep_driver_log(tmp, path)


def _keep_driver_log(tmp: Path, path: Path) -> None:
    """Append the temporary log to ``path`` if its folder exists, else leave it and say where it is."""
    if not tmp.exists():
        return
    if path.parent.is_dir():
        with path.open("ab") as out:
            out.write(tmp.read_bytes())
        tmp.unlink()
    elif tmp.stat().st_size:
        print(f"Ray's driver log of this run: {tmp}", file=sys.stderr, flush=True)
    else:
        tmp.unlink()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = str(value)
        return text if len(text) <= 18 else "..." + text[-15:]
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.{max(1, digits - 2)}f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class TrialProgress(Callback):
    """Tune callback that prints the live trial table (see the module docstring).

    Args:
        metric, mode: the optimised metric (``val_srcc``, ``max``).
        params: the searched hyperparameters, shown as columns.
        scheduler: name of the trial scheduler ("asha"), to say who stopped a trial early.
        every: seconds between tables (a table is printed only when something changed).
        out: where to print (stdout).
        max_rows: trials shown per table; the rest are counted.
        clock: time source (tests pass a fake one).
    """

    def __init__(self, metric: str = "val_srcc", mode: str = "max", params: Sequence[str] = (),
                 scheduler: str | None = None, every: float = DEFAULT_PROGRESS_EVERY_S, out: TextIO | None = None,
                 max_rows: int = MAX_ROWS, clock: Any = time.monotonic, rule: SelectionRule | None = None) -> None:
        if every < 0:
            raise ValueError(f"progress interval must be >= 0 seconds, got {every}")
        self.metric, self.mode = metric, mode
        # The study's selection rule (several objectives, a budget); None: best metric
        self.rule = rule
        extra = [m for m, _ in rule.objectives] + [c for c, _ in rule.budgets] if rule is not None else []
        self._keys = tuple(dict.fromkeys(("epoch", "best_epoch", metric, *extra)))
        self.params = tuple(params)
        self.scheduler = scheduler
        self.every = float(every)
        self.out = out
        self.max_rows = max_rows
        self.clock = clock
        self._started = clock()
        self._last_table = -math.inf
        self._dirty = False
        # trial id -> its reports, slimmed to what selection reads (epoch, best_epoch, the metric)
        self._reports: dict[str, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------------ Tune hooks

    def setup(self, **info: Any) -> None:
        self._started = self.clock()

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        slim = {k: result[k] for k in self._keys if k in result}
        self._reports.setdefault(trial.trial_id, []).append(slim)
        self._dirty = True

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = self.clock()
        if self._dirty and now - self._last_table >= self.every and now - self._started >= self.every:
            self.print_table(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._say(self.trial_line(trial))
        self._dirty = True

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._say(f"trial {trial.trial_id} failed at epoch {self._epoch(trial) or 0} and will be retried from its "
                  f"last checkpoint: {self._error_line(trial)}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        where = f"; traceback: {trial.error_file}" if getattr(trial, "error_file", None) else ""
        self._say(f"trial {trial.trial_id} ERROR at epoch {self._epoch(trial) or 0}: {self._error_line(trial)}{where}")
        self._dirty = True

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.print_table(trials, final=True)

    # ------------------------------------------------------------------ rendering

    def trial_line(self, trial: Any) -> str:
        """One line for a finished trial: why it ended, its last and best metric, its time."""
        r = trial.last_result or {}
        epoch, planned = self._epoch(trial), (trial.config or {}).get("epochs")
        if r.get("stopped_early"):
            how = "stopped early (no validation gain)"
        elif planned is not None and epoch is not None and epoch < planned:
            how = f"stopped by {self.scheduler}" if self.scheduler and self.scheduler != "none" else "stopped"
        else:
            how = "finished"
        return (f"trial {trial.trial_id} {how} at epoch {_fmt(epoch)}/{_fmt(planned)}: {self.metric} "
                f"{_fmt(r.get(self.metric))}, kept {self._kept(trial.trial_id)}, "
                f"{_duration(r.get('time_total_s') or 0.0)}")

    def render(self, trials: list[Any], final: bool = False) -> str:
        """The table as text: a header line of counts and the best so far, then one row per trial."""
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        order = ("RUNNING", "PENDING", "PAUSED", "TERMINATED", "ERROR")
        state = ", ".join(f"{counts[s]} {s.lower()}" for s in order if counts.get(s))
        best_id = self._selected()
        best = f"; selected so far: {best_id} ({self.metric} {self._kept(best_id)})" if best_id else ""
        head = f"[{'search done' if final else 'search'} {_duration(self.clock() - self._started)}] " \
               f"{len(trials)} trials: {state or 'none yet'}{best}"
        shown = self._rows(trials, final)
        columns = ["trial", "status", "epoch", self.metric, "val_plcc", "kept@epoch", "lr now", "time", *self.params]
        rows = [columns]
        for t in shown:
            r = t.last_result or {}
            epoch, planned = self._epoch(t), (t.config or {}).get("epochs")
            rows.append([
                t.trial_id, t.status.lower(), f"{_fmt(epoch)}/{_fmt(planned)}" if epoch is not None else "-",
                _fmt(r.get(self.metric)), _fmt(r.get("val_plcc")), self._kept(t.trial_id),
                _fmt(r.get("lr_head"), 3), _duration(r["time_total_s"]) if r.get("time_total_s") else "-",
                *[_fmt((t.config or {}).get(p), 3) for p in self.params],
            ])
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        lines = [head] + ["  " + "  ".join(cell.rjust(w) if k >= 2 else cell.ljust(w)
                                           for k, (cell, w) in enumerate(zip(row, widths))).rstrip()
                          for row in rows]
        hidden = len(trials) - len(shown)
        if hidden > 0:
            lines.append(f"  ... {hidden} more trials ({'trials.parquet lists every one' if final else 'pending or lower'})")
        return "\n".join(lines)

    def print_table(self, trials: list[Any], final: bool = False) -> None:
        self._say(self.render(trials, final))
        self._last_table = self.clock()
        self._dirty = False

    # ------------------------------------------------------------------ helpers

    def _rows(self, trials: list[Any], final: bool) -> list[Any]:
        """Running trials first, then the others by the value selection judges them by (best first);
        at most ``max_rows``."""
        sign = -1.0 if self.mode == "max" else 1.0

        def rank(t: Any) -> tuple[int, float]:
            group = {"RUNNING": 0, "ERROR": 2, "PENDING": 3}.get(t.status, 1)
            if final and t.status == "RUNNING":
                group = 1
            score = self._score(t.trial_id)
            return group, sign * score if score is not None else math.inf

        return sorted(trials, key=rank)[: self.max_rows]

    def _score(self, trial_id: str) -> float | None:
        """The trial's metric at the epoch whose weights it keeps (what selection compares)."""
        reports = self._reports.get(trial_id)
        return trial_score(reports, self.metric, self.mode) if reports else None

    def _kept(self, trial_id: str) -> str:
        """``value@epoch`` of the kept epoch, ``-`` before the first report."""
        score = self._score(trial_id)
        if score is None:
            return "-"
        kept = kept_report(self._reports[trial_id])
        return f"{_fmt(score)}@{kept['epoch']}" if kept is not None and "epoch" in kept else _fmt(score)

    def _selected(self) -> str | None:
        """The trial the search would hand back now: the summary's rule (:mod:`iqa_ray.core.selection`)."""
        if not self._reports:
            return None
        if self.rule is not None:
            return select_by_rule(self._reports, self.rule)
        return select_trial(self._reports, self.metric, self.mode)

    @staticmethod
    def _epoch(trial: Any) -> int | None:
        r = trial.last_result or {}
        epoch = r.get("epoch", r.get("training_iteration"))
        return int(epoch) if isinstance(epoch, (int, float)) else None

    @staticmethod
    def _error_line(trial: Any) -> str:
        """The last line of the trial's traceback (the exception), if Tune wrote one."""
        path = getattr(trial, "error_file", None)
        try:
            text = Path(path).read_text(errors="replace").strip() if path else ""
        except OSError as exc:
            return f"(could not read {path}: {exc})"
        return text.splitlines()[-1] if text else "(no traceback recorded)"

    def _say(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)
