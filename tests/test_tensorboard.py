"""TensorBoard: per-epoch scalars for every trial and one HParams session per trial.

Everything is checked through a real ``tensorboard`` process bound to 127.0.0.1 and its HTTP
data API (the calls the dashboards make):

* ``GET  /data/runs``                                   -> ["trial_<id>", ...]
* ``GET  /data/plugin/scalars/tags``                    -> {run: {tag: {...}}}
* ``GET  /data/plugin/scalars/scalars?run=R&tag=T``     -> [[wall_time, step, value], ...]
* ``POST /data/plugin/hparams/experiment``      body ``GetExperimentRequest`` as JSON
* ``POST /data/plugin/hparams/session_groups``  body ``ListSessionGroupsRequest`` as JSON

(the HParams routes parse ``request.data`` as protobuf JSON, so they need
``Content-Type: application/json``; see ``tensorboard/plugins/hparams/hparams_plugin.py``).

The fast tests drive the callback with stand-in trials; the slow one runs a real search.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from iqa_ray.cli.tensorboard import main as tensorboard_main
from iqa_ray.search.study_file import parse_study
from iqa_ray.search.tensorboard import (
    BOOKKEEPING,
    HParamsCallback,
    scalar_tag,
    start_tensorboard,
    stop_tensorboard,
    tensorboard_command,
)

ROOT = Path(__file__).resolve().parents[1]
T = scalar_tag  # reported key -> its TensorBoard tag (val_srcc -> val/srcc)
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
FINAL_METRICS = ("best_val_srcc", "val_srcc", "val_plcc", "val_krcc", "epoch")
SEARCHED = {"backbone", "lr", "dropout"}

TINY_STUDY = """
[study]
description = "tiny study for the TensorBoard test: lr searched inside a range per backbone"
num_samples = 3
max_epochs = 2
grace_period = 1
reduction_factor = 2
searcher = "optuna"
trial_scheduler = "asha"
seed = 0

[fixed]
family = "mlp"
pretrained = "offline"
hidden_dim = 16
crop_size = 64
eval_patches = 1
batch_size = 32

[params.backbone]
role = "scientific"
type = "choice"
values = ["efficientnet_lite0", "tf_efficientnet_lite0"]

[params.lr]
role = "nuisance"
type = "loguniform"
[params.lr.range_by.backbone]
efficientnet_lite0 = [1e-4, 1e-3]
tf_efficientnet_lite0 = [1e-3, 3e-3]

[params.dropout]
role = "scientific"
type = "uniform"
low = 0.0
high = 0.5
"""
LR_RANGES = {"efficientnet_lite0": (1e-4, 1e-3), "tf_efficientnet_lite0": (1e-3, 3e-3)}


def tiny_study():
    import tomllib

    return parse_study(tomllib.loads(TINY_STUDY), name="tiny_tb")


# ----------------------------------------------------------------------------- HTTP helpers


class TB:
    """A started TensorBoard and the data API calls the tests make."""

    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def runs(self) -> list[str]:
        return self.get("/data/runs")

    def scalars(self, run: str, tag: str) -> list[list[float]]:
        return self.get("/data/plugin/scalars/scalars", run=run, tag=tag)

    def experiment(self) -> dict:
        return self.post("/data/plugin/hparams/experiment", {"experimentName": ""})

    def session_groups(self, sort_metric: str | None = None) -> dict:
        body: dict[str, Any] = {"experimentName": "", "allowedStatuses": ALL_STATUSES, "startIndex": 0,
                                "sliceSize": 1000}
        if sort_metric:
            body["colParams"] = [{"metric": {"tag": T(sort_metric), "group": ""}, "order": "ORDER_DESC"}]
        return self.post("/data/plugin/hparams/session_groups", body)


@pytest.fixture
def tensorboard():
    """start(logdir) -> TB; every process started is stopped, and checked gone, at the end."""
    started: list[tuple[subprocess.Popen, list[psutil.Process]]] = []

    def start(logdir: Path, expect_runs: set[str]) -> TB:
        proc, url = start_tensorboard(logdir)
        family = [psutil.Process(proc.pid)]
        family += family[0].children(recursive=True)  # the Rust data server, when it is used
        started.append((proc, family))
        assert urllib.parse.urlsplit(url).hostname == "127.0.0.1", url
        port = urllib.parse.urlsplit(url).port
        listening = [(p.pid, c.laddr) for p in family if p.is_running()
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert any(addr.ip == "127.0.0.1" and addr.port == port for _, addr in listening), listening
        assert all(addr.ip in ("127.0.0.1", "::1") for _, addr in listening), \
            f"TensorBoard listens beyond the loopback interface: {listening}"
        tb = TB(url)
        # It loads the logdir in the background: wait (bounded) until every run and session is in.
        deadline = time.monotonic() + 60
        while True:
            runs = set(tb.runs())
            if expect_runs <= runs and tb.session_groups()["totalSize"] >= len(expect_runs):
                return tb
            assert time.monotonic() < deadline, f"TensorBoard has runs {sorted(runs)}, expected {sorted(expect_runs)}"
            time.sleep(0.5)

    yield start
    for proc, family in started:
        stop_tensorboard(proc)
        assert proc.poll() is not None
        gone, alive = psutil.wait_procs([p for p in family if p.pid != proc.pid], timeout=10)
        assert not alive, f"left running: {alive}"


# ----------------------------------------------------------------------------- checks


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # scalars are stored as float32


def check_experiment(exp: dict, study) -> None:
    names = {h["name"] for h in exp["hparamInfos"]}
    assert SEARCHED <= names, f"searched hyperparameters missing from the HParams experiment: {names}"
    assert not any(n.endswith("__unit") for n in names), f"unresolved search keys listed: {names}"
    assert set(study.fixed) <= names
    lr = next(h for h in exp["hparamInfos"] if h["name"] == "lr")
    assert lr["domainInterval"] == {"minValue": 1e-4, "maxValue": 3e-3}
    backbone = next(h for h in exp["hparamInfos"] if h["name"] == "backbone")
    assert set(backbone["domainDiscrete"]) == set(LR_RANGES)
    metrics = [m["name"]["tag"] for m in exp["metricInfos"]]
    assert {T(m) for m in FINAL_METRICS} <= set(metrics), metrics
    assert {"val/best_srcc", "val/srcc", "val/plcc", "val/krcc", "progress/epoch"} <= set(metrics), metrics
    assert len(metrics) == len(set(metrics))
    assert not any(m.startswith("ray/tune/") or m.split("/")[-1] in BOOKKEEPING for m in metrics), \
        "Tune bookkeeping listed as metrics"
    # Test figures per trial would invite choosing on test: only the selected trial is scored, after the search.
    assert not any("test" in m for m in metrics), metrics


def check_group(group: dict, trial_id: str, config: dict, results: list[dict], study, failed: bool = False) -> None:
    sessions = group["sessions"]
    assert [s["name"] for s in sessions] == [f"trial_{trial_id}"], "one session per trial, no duplicates"
    assert sessions[0]["status"] == ("STATUS_FAILURE" if failed else "STATUS_SUCCESS")
    expected = study.resolve(config)
    hparams = group["hparams"]
    assert not any(k.endswith("__unit") for k in hparams)
    for key in SEARCHED | set(study.fixed):
        assert key in hparams, f"trial {trial_id}: hyperparameter {key} missing ({hparams})"
        value = expected[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert close(hparams[key], value), (key, hparams[key], value)
        else:
            assert hparams[key] == value, (key, hparams[key], value)
    lo, hi = LR_RANGES[expected["backbone"]]
    assert lo <= hparams["lr"] <= hi, "lr is the resolved learning rate, inside its backbone's range"
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    last = results[-1] if results else {}
    for metric in FINAL_METRICS:
        if metric in last:
            assert T(metric) in values, f"trial {trial_id}: final {metric} missing"
            assert close(values[T(metric)], last[metric]), (trial_id, metric, values[T(metric)], last[metric])
        else:
            assert T(metric) not in values, f"trial {trial_id}: {metric} was never reported"


def check_scalars(tb: TB, trial_id: str, results: list[dict]) -> None:
    run = f"trial_{trial_id}"
    tags = tb.get("/data/plugin/scalars/tags").get(run, {})
    if not results:
        assert "val/srcc" not in tags, f"{run} reported nothing, yet has val/srcc points"
        return
    # Readable tags only: one per reported number, none for Tune's bookkeeping.
    assert not any(t.startswith("ray/tune/") for t in tags), sorted(tags)
    reported = {T(k) for r in results for k, v in r.items()
                if T(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    assert set(tags) == reported, (sorted(tags), sorted(reported))
    for key in ("done", "training_iteration", "time_this_iter_s", "timestamp", "pid", "date"):
        assert T(key) is None
    assert {"val/srcc", "val/plcc", "val/krcc", "val/rmse", "train/loss", "throughput/images_per_s"} <= set(tags)
    assert any(t.startswith("lr/") for t in tags), sorted(tags)
    points = tb.scalars(run, "val/srcc")
    assert [int(step) for _, step, _ in points] == [r["training_iteration"] for r in results], \
        f"{run}: one val_srcc point per reported epoch"
    assert all(close(v, r["val_srcc"]) for (_, _, v), r in zip(points, results))


# ----------------------------------------------------------------------------- fast: the callback


class FakeTrial:
    """What Tune's logger callbacks use of a trial."""

    def __init__(self, root: Path, trial_id: str, config: dict, evaluated: dict):
        self.trial_id = trial_id
        self.config = config
        self.evaluated_params = evaluated
        self.local_path = str(root / f"trial_{trial_id}")

    def init_local_path(self) -> None:
        os.makedirs(self.local_path, exist_ok=True)


def epoch_result(epoch: int, srcc: float) -> dict:
    return {"epoch": epoch, "training_iteration": epoch, "train_loss": 9.0 - epoch, "train_l1": 8.0, "lr_head": 1e-3,
            "lr_backbone": 1e-4, "val_srcc": srcc,
            "val_plcc": srcc + 0.01, "val_krcc": srcc - 0.1, "val_rmse": 11.0, "best_val_srcc": srcc,
            "best_epoch": epoch, "images_per_s": 50.0, "done": False, "time_this_iter_s": 1.0}


def fake_search(root: Path, callback) -> dict[str, tuple[dict, list[dict], bool]]:
    """Four trials: one ASHA stopped after epoch 1 (sorted first, so a per-trial experiment config
    would come from it), one that ran both epochs, one that failed before its first epoch and one
    whose end Tune reported without a start (its actor never came up)."""
    study = tiny_study()
    trials = {
        "a0000001": ({**study.constants(), "backbone": "tf_efficientnet_lite0", "lr__unit": 0.5, "dropout": 0.1},
                     [epoch_result(1, 0.30)], False),
        "b0000002": ({**study.constants(), "backbone": "efficientnet_lite0", "lr__unit": 0.25, "dropout": 0.2},
                     [epoch_result(1, 0.40), epoch_result(2, 0.55)], False),
        "c0000003": ({**study.constants(), "backbone": "efficientnet_lite0", "lr__unit": 0.9, "dropout": 0.3},
                     [], True),
        "d0000004": ({**study.constants(), "backbone": "tf_efficientnet_lite0", "lr__unit": 0.1, "dropout": 0.4},
                     [], True),
    }
    for trial_id, (config, results, failed) in trials.items():
        evaluated = {k: config[k] for k in ("backbone", "lr__unit", "dropout")}
        trial = FakeTrial(root, trial_id, config, evaluated)
        if trial_id != "d0000004":
            callback.log_trial_start(trial)
        for i, result in enumerate(results):
            callback.log_trial_result(i + 1, trial, {**result, "config": config})
        callback.log_trial_end(trial, failed=failed)
    return trials


def test_hparams_sessions_from_the_callback(tmp_path, tensorboard):
    study = tiny_study()
    trials = fake_search(tmp_path, HParamsCallback(study))
    tb = tensorboard(tmp_path, {f"trial_{t}" for t in trials})
    check_experiment(tb.experiment(), study)
    groups = tb.session_groups(sort_metric="best_val_srcc")
    assert groups["totalSize"] == 4
    assert [g["name"] for g in groups["sessionGroups"][:2]] == ["b0000002", "a0000001"], "sorted by best_val_srcc"
    by_name = {g["name"]: g for g in groups["sessionGroups"]}
    for trial_id, (config, results, failed) in trials.items():
        check_group(by_name[trial_id], trial_id, config, results, study, failed=failed)
        check_scalars(tb, trial_id, results)


def test_tunes_own_logger_fails_the_same_checks(tmp_path, tensorboard):
    """What the callback fixes: Tune's stock TBX logger logs ``lr__unit``, takes the experiment's
    metric list from whichever trial TensorBoard reads first and drops the failed trial."""
    from ray.tune.logger import TBXLoggerCallback

    study = tiny_study()
    trials = fake_search(tmp_path, TBXLoggerCallback())
    tb = tensorboard(tmp_path, {f"trial_{t}" for t in trials if trials[t][1]})
    with pytest.raises(AssertionError):
        check_experiment(tb.experiment(), study)
    names = {g["name"] for g in tb.session_groups()["sessionGroups"]}
    assert len(names) == 2, "the trials that failed before reporting have no session"
    exp = tb.experiment()
    assert "lr__unit" in {h["name"] for h in exp["hparamInfos"]}


def test_tensorboard_command_is_loopback_only(tmp_path, capsys):
    assert tensorboard_command(tmp_path / "exp 1") == f"tensorboard --logdir '{tmp_path}/exp 1' --host 127.0.0.1"
    assert "--port 7007" in tensorboard_command("x", port=7007)
    (tmp_path / "exp").mkdir()
    assert tensorboard_main([str(tmp_path / "exp")]) == 0
    assert capsys.readouterr().out.strip() == tensorboard_command((tmp_path / "exp").resolve())
    assert tensorboard_main([str(tmp_path / "missing")]) == 2


def test_callback_survives_pickling_with_the_tuner():
    import pickle

    callback = pickle.loads(pickle.dumps(HParamsCallback(tiny_study())))
    assert isinstance(callback, HParamsCallback) and callback._trial_writer == {}


def test_a_tensorboard_that_cannot_start_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="tensorboard"):
        start_tensorboard(tmp_path, extra_args=("--no-such-flag",), timeout=30)


# ----------------------------------------------------------------------------- slow: a real search


@pytest.mark.slow
def test_real_search_in_tensorboard_and_mlflow(tmp_path, tiny_dataset, tensorboard, capsys, shared_ray):
    """One real search, seen by TensorBoard and, with ``--mlflow``, by MLflow's client (the checks of
    tests/test_mlflow.py)."""
    from test_mlflow import check_tracked_search

    from iqa_ray.cli.tune import main

    study_path = tmp_path / "tiny_tb.toml"
    study_path.write_text(TINY_STUDY)
    code = main(["--study", str(study_path), "--storage", str(tmp_path), "--name", "tb", "--cpus-per-trial", "1",
                 "--dataset", str(tiny_dataset.path), "--mlflow"], prog="launch/tune.py", require_study=True)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    exp = tmp_path / "tb"
    assert f"MLflow: mlflow ui --backend-store-uri sqlite:///{exp.resolve()}/mlflow.db" in out, out[-2000:]
    check_tracked_search(exp.resolve())
    trials = {}
    for folder in sorted(exp.glob("trial_*")):
        config = json.loads((folder / "params.json").read_text())
        results = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
        trials[folder.name.removeprefix("trial_")] = (config, results)
    assert len(trials) == 3 and all(results for _, results in trials.values())
    assert all("lr__unit" in config for config, _ in trials.values()), "the study searches lr through lr__unit"
    assert not any(k.startswith("test_") for _, results in trials.values() for r in results for k in r), \
        "trials report validation only"

    study = tiny_study()
    tb = tensorboard(exp, {f"trial_{t}" for t in trials})
    for trial_id, (config, results) in trials.items():
        check_scalars(tb, trial_id, results)
    check_experiment(tb.experiment(), study)
    groups = tb.session_groups(sort_metric="best_val_srcc")
    assert groups["totalSize"] == len(trials), "one session group per trial"
    order = [g["name"] for g in groups["sessionGroups"]]
    assert order == sorted(trials, key=lambda t: -trials[t][1][-1]["best_val_srcc"]), "sorted by best_val_srcc"
    for group in groups["sessionGroups"]:
        config, results = trials[group["name"]]
        check_group(group, group["name"], config, results, study)
