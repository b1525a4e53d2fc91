"""MLflow tracking of a search (``--mlflow``): the flag, its checks before anything starts, the trial
runs and the summary run, all read back through MLflow's client API.

The fast tests drive the callback with stand-in trials on one SQLite store; the real search is
``tests/test_tensorboard.py::test_real_search_in_tensorboard_and_mlflow``, which checks its store
with :func:`check_tracked_search`.
"""

from __future__ import annotations

import http.server
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_tensorboard import epoch_result, tiny_study

from iqa_ray.cli.tune import build_parser, main
from iqa_ray.core.errors import LaunchError
from iqa_ray.search.mlflow_runs import LOST, TrialRuns, log_summary, metric_values
from iqa_ray.search.mlflow_store import INSTALL_HINT, check_uri, default_store
from iqa_ray.search.settings import settings_from_args


def parse(*argv):
    return build_parser("ranking").parse_args(list(argv))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the flag and its checks


def test_the_flag_alone_means_a_store_in_the_experiment_folder(tmp_path):
    assert parse().mlflow is None
    assert settings_from_args(parse("--name", "exp", "--storage", str(tmp_path)), "ranking").mlflow is None
    settings = settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--mlflow"), "ranking")
    assert settings.mlflow == f"sqlite:///{tmp_path.resolve()}/exp/mlflow.db"
    assert not any(tmp_path.iterdir()), "reading the flags writes nothing: the experiment folder must stay free"
    # Before --resume in argparse's eyes, the flag still takes no value.
    assert parse("--mlflow", "--resume").mlflow == "local" and parse("--mlflow", "--resume").resume


@pytest.mark.parametrize("uri, match", [
    ("mlruns", "MLflow 3 refuses file stores"),
    ("file:///tmp/mlruns", "MLflow 3 refuses file stores"),
    ("ftp://host/x", "unknown tracking URI scheme 'ftp'; valid: --mlflow \\(no value"),
    ("sqlite://relative.db", "four slashes"),
    ("sqlite:///:memory:", "four slashes"),
    ("sqlite:////no/such/folder/mlflow.db", "the folder /no/such/folder does not exist"),
    ("http://", "needs a host"),
])
def test_a_uri_mlflow_cannot_use_is_refused_naming_the_valid_forms(uri, match, capsys, monkeypatch):
    import iqa_ray.search.run

    monkeypatch.setattr(iqa_ray.search.run, "run_search", lambda *a: pytest.fail("the search started"))
    assert main(["--mlflow", uri], study="ranking") == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_uris_mlflow_can_use_pass(tmp_path):
    for uri in (f"sqlite:///{tmp_path}/shared.db", "postgresql+psycopg2://u@db:5432/mlflow", "mysql://db/mlflow",
                "https://mlflow.example.org", "http://10.0.0.5:5000/prefix"):
        check_uri(uri)


def test_the_default_store_needs_a_local_experiment_folder(capsys):
    assert main(["--storage", "s3://bucket/iqa", "--mlflow"], study="ranking") == 2
    err = capsys.readouterr().err
    assert "--storage s3://bucket/iqa is remote" in err and "--mlflow http(s)://HOST[:PORT]" in err


def test_without_mlflow_the_flag_fails_before_anything_starts(monkeypatch, capsys):
    import iqa_ray.search.run
    import iqa_ray.search.settings

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    monkeypatch.setattr(iqa_ray.search.settings, "load_study", lambda *a: pytest.fail("the study was loaded"))
    monkeypatch.setattr(iqa_ray.search.run, "run_search", lambda *a: pytest.fail("the search started"))
    assert main(["--mlflow"], study="ranking") == 2
    assert INSTALL_HINT in capsys.readouterr().err


def test_without_the_flag_mlflow_is_not_needed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert settings_from_args(parse("--name", "exp", "--storage", str(tmp_path)), "ranking").mlflow is None


class Server(http.server.BaseHTTPRequestHandler):
    """A stand-in tracking server: ``get-by-name`` finds only the experiment ``taken``."""

    def do_GET(self):
        taken = "experiment_name=taken" in self.path and self.path.startswith("/api/2.0/mlflow/experiments/get-by-name")
        body = (json.dumps({"experiment": {"experiment_id": "7", "name": "taken"}}) if taken
                else json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST"})).encode()
        self.send_response(200 if taken else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def tracking_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_tracking_server_must_answer_and_not_hold_the_experiment_already(tracking_server, tmp_path):
    fresh = settings_from_args(parse("--name", "fresh", "--storage", str(tmp_path), "--mlflow", tracking_server),
                               "ranking")
    assert fresh.mlflow == tracking_server
    with pytest.raises(LaunchError, match="an MLflow experiment named 'taken' exists there already"):
        settings_from_args(parse("--name", "taken", "--storage", str(tmp_path), "--mlflow", tracking_server), "ranking")
    down = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(LaunchError, match="the tracking server does not answer"):
        settings_from_args(parse("--name", "x", "--storage", str(tmp_path), "--mlflow", down), "ranking")
    assert time.monotonic() - started < 15


def _started(tmp_path, *argv):
    """Record an experiment as the launcher does when a search starts; return its settings."""
    from iqa_ray.search.run import write_experiment_info

    args = parse("--name", "exp", "--storage", str(tmp_path), *argv)
    settings = settings_from_args(args, "ranking")
    write_experiment_info(settings, args)
    return settings


def test_a_resume_keeps_logging_where_the_search_started(tmp_path):
    started = _started(tmp_path, "--mlflow")
    record = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert record["mlflow"] == {"tracking_uri": default_store(tmp_path / "exp"), "experiment": "exp"}
    resume = ("--name", "exp", "--storage", str(tmp_path), "--resume")
    assert settings_from_args(parse(*resume), "ranking").mlflow == started.mlflow, "recorded: no flag needed"
    assert settings_from_args(parse(*resume, "--mlflow"), "ranking").mlflow == started.mlflow
    with pytest.raises(LaunchError, match="the experiment tracks to sqlite:///"):
        settings_from_args(parse(*resume, "--mlflow", f"sqlite:///{tmp_path}/other.db"), "ranking")


def test_a_resume_cannot_start_tracking_a_search_started_without(tmp_path):
    _started(tmp_path)
    resume = ("--name", "exp", "--storage", str(tmp_path), "--resume")
    assert settings_from_args(parse(*resume), "ranking").mlflow is None
    with pytest.raises(LaunchError, match="started without MLflow tracking"):
        settings_from_args(parse(*resume, "--mlflow"), "ranking")


# ----------------------------------------------------------------------------- the trial runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module's tests (creating one takes MLflow several seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the tables
    return uri


class FakeTrial:
    """What the MLflow callback uses of a trial."""

    def __init__(self, trial_id: str, config: dict, error_file: str | None = None):
        self.trial_id, self.config, self.error_file = trial_id, config, error_file
        self.last_result: dict = {}

    def __str__(self) -> str:
        return f"iqa_trainable_{self.trial_id}"


def callback(store: str, name: str, tmp_path: Path, stops=(frozenset({1}), False)) -> TrialRuns:
    return TrialRuns(store, experiment_name=name, study=tiny_study(), max_epochs=2, stops=stops,
                     artifacts=(tmp_path / "artifacts").as_uri(), tags={"study": "tiny_tb"})


def report(cb: TrialRuns, trial: FakeTrial, result: dict) -> None:
    trial.last_result = {**result, "trial_id": trial.trial_id}
    cb.log_trial_result(result["training_iteration"], trial, {**result, "config": trial.config,
                                                              "config/lr__unit": 0.5, "pid": 123})


def runs_by_trial(store: str, name: str) -> dict:
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("kind") == "trial"}


def history(store: str, run, metric: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(store).get_metric_history(run.info.run_id, metric))


def test_every_trial_is_a_run_with_its_resolved_params_epochs_and_how_it_ended(store, tmp_path):
    study = tiny_study()
    cb = callback(store, "trials", tmp_path)
    cb.setup()
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    base = study.constants()
    trials = {
        "a1": (FakeTrial("a1", {**base, "backbone": "tf_efficientnet_lite0", "lr__unit": 0.5, "dropout": 0.1}),
               [epoch_result(1, 0.30)], False),  # stopped by ASHA at its rung
        "b2": (FakeTrial("b2", {**base, "backbone": "efficientnet_lite0", "lr__unit": 0.25, "dropout": 0.2}),
               [epoch_result(1, 0.40), epoch_result(2, 0.55)], False),  # all its epochs
        "c3": (FakeTrial("c3", {**base, "backbone": "efficientnet_lite0", "lr__unit": 0.9, "dropout": 0.3},
                         error_file=str(error_file)), [epoch_result(1, 0.2)], True),  # an error in epoch 2
    }
    for trial, results, failed in trials.values():
        cb.log_trial_start(trial)
        for result in results:
            report(cb, trial, result)
        cb.log_trial_end(trial, failed=failed)
    never_started = FakeTrial("d4", {**base, "backbone": "efficientnet_lite0", "lr__unit": 0.1, "dropout": 0.4})
    cb.log_trial_end(never_started, failed=True)  # Tune ends a trial whose actor never came up

    runs = runs_by_trial(store, "trials")
    assert set(runs) == {"a1", "b2", "c3", "d4"}, "one run per trial, the one that never started included"
    expected = {"a1": ("KILLED", "scheduler"), "b2": ("FINISHED", "completed"), "c3": ("FAILED", "error"),
                "d4": ("FAILED", "error")}
    for trial_id, run in runs.items():
        assert (run.info.status, run.data.tags["ended_by"]) == expected[trial_id], trial_id
        assert run.data.tags["study"] == "tiny_tb" and run.info.run_name == f"iqa_trainable_{trial_id}"
    assert runs["c3"].data.tags["error"] == "RuntimeError: CUDA out of memory"
    for trial_id, (trial, results, _) in trials.items():
        params = runs[trial_id].data.params
        resolved = study.reported_config(trial.config)
        assert "lr__unit" not in params, "the resolved learning rate, not the searched unit"
        assert math.isclose(float(params["lr"]), resolved["lr"]) and params["backbone"] == resolved["backbone"]
        assert {k: params[k] for k in study.fixed} == {k: str(resolved[k]) for k in study.fixed}
        assert history(store, runs[trial_id], "val_srcc") == [(r["epoch"], r["val_srcc"]) for r in results]
        metrics = set(runs[trial_id].data.metrics)
        assert {"train_loss", "lr_head", "best_val_srcc", "epoch", "images_per_s"} <= metrics
        assert not metrics & {"done", "training_iteration", "time_this_iter_s", "pid", "config/lr__unit"}, metrics


def test_a_resumed_search_finds_its_trials_runs_and_logs_each_epoch_once(store, tmp_path):
    import ray.cloudpickle

    first = callback(store, "resumed", tmp_path)
    restored = ray.cloudpickle.loads(ray.cloudpickle.dumps(first))  # what Tuner.restore unpickles
    first.setup()
    trial = FakeTrial("r1", {**tiny_study().constants(), "backbone": "efficientnet_lite0", "lr__unit": 0.3,
                             "dropout": 0.1})
    first.log_trial_start(trial)
    report(first, trial, epoch_result(1, 0.40))
    # The driver dies here. The resumed one restores the trial from its epoch-1 checkpoint... or from
    # before it: Tune may report epoch 1 again.
    lost = FakeTrial("lost", {**trial.config, "lr__unit": 0.7})  # started, then the kill: Tune's snapshot missed it
    first.log_trial_start(lost)
    restored.setup()
    restored.log_trial_start(trial)
    report(restored, trial, epoch_result(1, 0.41))
    report(restored, trial, epoch_result(2, 0.50))
    restored.log_trial_end(trial)
    restored.on_experiment_end([trial])
    runs = runs_by_trial(store, "resumed")
    assert sorted(runs) == ["lost", "r1"], "the trial kept its run"
    assert history(store, runs["r1"], "val_srcc") == [(1, 0.40), (2, 0.50)], "epoch 1 logged once, as first reported"
    assert runs["r1"].info.status == "FINISHED"
    assert (runs["lost"].info.status, runs["lost"].data.tags["ended_by"]) == ("KILLED", "interrupted")
    assert len(ray.cloudpickle.dumps(restored)) < 100_000, "no client or run table in the pickled state"


def test_a_failing_store_stops_the_logging_not_the_search(store, tmp_path, capsys, monkeypatch):
    from mlflow.exceptions import MlflowException

    cb = callback(store, "failing", tmp_path)
    cb.setup()
    trial = FakeTrial("f1", {**tiny_study().constants(), "backbone": "efficientnet_lite0", "lr__unit": 0.3,
                             "dropout": 0.1})
    cb.log_trial_start(trial)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise MlflowException("database is locked")

    monkeypatch.setattr(cb._client, "log_batch", broken)
    report(cb, trial, epoch_result(1, 0.4))
    report(cb, trial, epoch_result(2, 0.5))
    cb.log_trial_end(trial)
    err = capsys.readouterr().err
    assert err.count("[mlflow] logging stopped") == 1 and "database is locked" in err
    assert len(calls) == 1, "no more calls to a store that failed"
    assert cb.failure == "MlflowException: database is locked"


def test_metrics_are_the_reported_numbers_without_tunes_bookkeeping():
    import numpy as np

    metrics = metric_values({"val_srcc": np.float32(0.5), "epoch": 3, "done": False, "stopped_early": False,
                             "trial_id": "x", "config": {"lr": 1}, "config/lr": 1.0, "hostname": "h", "nan": math.nan,
                             "array": np.zeros(3)})
    assert set(metrics) == {"val_srcc", "epoch", "nan"} and metrics["val_srcc"] == 0.5


# ----------------------------------------------------------------------------- the summary run


SUMMARY = {
    "study": "ranking", "model": "refit/trial_abc", "best_trial_id": "b2", "trials": 3, "errored_trials": 1,
    "elapsed_s": 12.5, "total_s": 30.0, "best_config": {"lr": 0.001, "backbone": "efficientnet_lite0"},
    "best_val": {"srcc": 0.8, "plcc": 0.81, "epoch": 2, "val_srcc": 0.8},
    "test": {"srcc": 0.7, "plcc": 0.72, "krcc": 0.5, "rmse": 10.0, "n": 40},
    "test_source": "the selected configuration re-trained", "val_test_gap": 0.1, "versus_probe": 0.05,
    "baselines": {"linear_probe": {"srcc": 0.65, "plcc": 0.66, "n": 40, "backbone": "efficientnet_lite0", "alpha": 1.0},
                  "piqe": {"srcc": 0.3, "plcc": 0.31, "n": 40}, "brisque": {"srcc": 0.35, "plcc": 0.36, "n": 40}},
}


def test_the_summary_is_one_more_run_with_the_model_its_test_figures_and_the_baselines(store, tmp_path):
    settings = settings_from_args(parse("--name", "summarised", "--storage", str(tmp_path), "--mlflow", store),
                                  "ranking")
    folder = tmp_path / "summarised"
    folder.mkdir()
    (folder / "experiment.json").write_text("{}")
    summary = log_summary(settings, json.loads(json.dumps(SUMMARY)))
    record = summary["mlflow"]
    assert "error" not in record, record
    assert record["tracking_uri"] == store and record["ui"] == f"mlflow ui --backend-store-uri {store}"
    client = MlflowClient(store)
    run = client.get_run(record["summary_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "summary"
    assert run.data.tags["model"] == "refit/trial_abc" and run.data.tags["best_trial_id"] == "b2"
    m = run.data.metrics
    assert {k: m[f"test_{k}"] for k in SUMMARY["test"]} == SUMMARY["test"]
    assert (m["best_val_srcc"], m["best_val_epoch"]) == (0.8, 2) and "best_val_val_srcc" not in m
    for name in ("linear_probe", "piqe", "brisque"):
        assert m[f"baseline_{name}_srcc"] == SUMMARY["baselines"][name]["srcc"]
    assert (m["versus_probe"], m["trials"], m["errored_trials"]) == (0.05, 3, 1)
    assert run.data.params == {"lr": "0.001", "backbone": "efficientnet_lite0"}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json", "experiment.json"}
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "download")))
    assert json.loads(local.read_text()) == json.loads((folder / "summary.json").read_text()) == summary
    experiment = client.get_experiment(record["experiment_id"])
    assert experiment.name == "summarised"
    assert experiment.artifact_location == (Path(store.removeprefix("sqlite:///")).parent / "mlflow-artifacts"
                                            / "summarised").as_uri(), "artifacts beside the store, not in ./mlruns"


def test_a_summary_run_that_cannot_be_logged_is_noted_and_the_summary_kept(tmp_path, capsys):
    settings = settings_from_args(parse("--name", "lost", "--storage", str(tmp_path), "--mlflow"), "ranking")
    folder = tmp_path / "lost"
    folder.mkdir()
    (folder / "mlflow.db").write_text("not a database")
    summary = log_summary(settings, json.loads(json.dumps(SUMMARY)))
    assert summary["mlflow"]["error"], summary["mlflow"]
    assert json.loads((folder / "summary.json").read_text())["mlflow"]["error"] == summary["mlflow"]["error"]
    assert "[mlflow] could not log the summary run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real search's store


def check_tracked_search(experiment: Path) -> None:
    """The MLflow store of a finished search, read back through MLflow's client: every trial of
    ``trials.parquet`` with its epochs of ``epochs.parquet``, its params and how it ended, and the
    summary run with the handed-back model's test figures and the baselines of ``summary.json``."""
    record = json.loads((experiment / "experiment.json").read_text())["mlflow"]
    summary = json.loads((experiment / "summary.json").read_text())
    uri = default_store(experiment)
    assert record == {"tracking_uri": uri, "experiment": experiment.name}
    assert summary["mlflow"]["tracking_uri"] == uri and "error" not in summary["mlflow"], summary["mlflow"]
    trials = pd.read_parquet(experiment / "trials.parquet")
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    searched = trials[trials.kind == "search"].set_index("trial_id")
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment.name)
    assert found.experiment_id == summary["mlflow"]["experiment_id"]
    assert found.artifact_location == (experiment / "mlflow-artifacts").as_uri()
    runs = client.search_runs([found.experiment_id], max_results=1000)
    by_trial = {r.data.tags["trial_id"]: r for r in runs if r.data.tags["kind"] == "trial"}
    # A trial a killed driver started before Tune recorded it (a resume replaces it): closed, not a trial.
    lost = {t for t, r in by_trial.items() if r.data.tags.get("ended_by") == "interrupted"}
    assert all(by_trial[t].info.status == "KILLED" and by_trial[t].data.tags["error"] == LOST for t in lost)
    by_trial = {t: r for t, r in by_trial.items() if t not in lost}
    assert set(by_trial) == set(searched.index), "every trial of the search, and only those, has a run"
    status = {"completed": "FINISHED", "scheduler": "KILLED", "error": "FAILED"}
    for trial_id, run in by_trial.items():
        row = searched.loc[trial_id]
        assert run.data.tags["ended_by"] == row["ended_by"] and run.info.status == status[row["ended_by"]]
        mine = epochs[(epochs.kind == "search") & (epochs.trial_id == trial_id)].sort_values("epoch")
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_srcc"))
        assert [s for s, _ in points] == mine.epoch.tolist(), f"trial {trial_id}: one point per epoch"
        assert all(math.isclose(v, e, rel_tol=1e-9) for (_, v), e in zip(points, mine.val_srcc)), trial_id
        # Its parameters: the resolved run config of trials.parquet, without the raw search keys (lr__unit).
        params = run.data.params
        assert set(params) == {c.removeprefix("config.") for c in searched.columns
                               if c.startswith("config.") and "__" not in c}, trial_id
        assert params == {k: str(row[f"config.{k}"]) for k in params}, trial_id
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED", "FAILED"}, "no run left RUNNING"
    (summary_run,) = [r for r in runs if r.data.tags["kind"] == "summary"]
    assert summary_run.info.run_id == summary["mlflow"]["summary_run_id"]
    assert summary_run.data.tags["model"] == summary["model"]
    m = summary_run.data.metrics
    for key in ("srcc", "plcc", "krcc", "rmse"):
        assert math.isclose(m[f"test_{key}"], summary["test"][key], rel_tol=1e-9), key
    for name in ("linear_probe", "piqe", "brisque"):
        assert math.isclose(m[f"baseline_{name}_srcc"], summary["baselines"][name]["srcc"], rel_tol=1e-9), name
    artifact = client.download_artifacts(summary_run.info.run_id, "summary.json", str(experiment.parent / "dl"))
    assert json.loads(Path(artifact).read_text()) == summary

