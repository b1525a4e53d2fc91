"""Fault injection: killed trial workers, a killed driver, non-finite losses, a killed pre-generation.

Each test runs the real launcher (in a subprocess where something must be killed) on a tiny
study over the tiny pre-generated dataset (conftest.py) and checks that nothing finished was lost.
Where a kill must land inside an epoch, ``patches_per_image`` makes the epochs last a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

TINY_STUDY = """
[study]
description = "tiny study for fault tests"
num_samples = {num_samples}
max_epochs = {max_epochs}
grace_period = 1
searcher = "{searcher}"
trial_scheduler = "{scheduler}"

[fixed]
family = "mlp"
hidden_dim = 16
crop_size = 64
eval_patches = 1
batch_size = 32
{extra_fixed}

[params.dropout]
role = "scientific"
type = "uniform"
low = 0.0
high = 0.5
grid = [0.1]
{extra_params}
"""


def write_study(tmp_path: Path, *, num_samples=2, max_epochs=3, searcher="random", scheduler="none",
                extra_fixed="", extra_params="") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_STUDY.format(num_samples=num_samples, max_epochs=max_epochs, searcher=searcher,
                                      scheduler=scheduler, extra_fixed=extra_fixed, extra_params=extra_params))
    return path


def launcher(study: Path, storage: Path, name: str, dataset, *extra: str) -> list[str]:
    return [PY, str(ROOT / "launch" / "tune.py"), *launch_flags(study, storage, name, dataset, *extra)]


def launch_flags(study: Path, storage: Path, name: str, dataset, *extra: str) -> list[str]:
    return ["--study", str(study), "--dataset", str(dataset), "--storage", str(storage), "--name", name,
            "--cpus-per-trial", "1", *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            start_new_session=True)


def results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended while waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_killed_trial_worker_restarts_from_its_checkpoint(tmp_path, tiny_dataset):
    study = write_study(tmp_path, num_samples=1, max_epochs=4, extra_fixed="patches_per_image = 8")
    log = tmp_path / "log.txt"
    proc = start(launcher(study, tmp_path, "killworker", tiny_dataset.path), log)
    try:
        exp = tmp_path / "killworker"

        def after_epoch_two():
            for trial in exp.glob("trial_*"):
                rows = results(trial)
                if rows and rows[-1]["epoch"] >= 2 and list(trial.glob("checkpoint_*")):
                    return trial, rows[-1]["pid"]
            return None

        trial, pid = wait_for(after_epoch_two, 300, "epoch 2 of the trial", proc, log)
        time.sleep(1.0)  # inside epoch 3 now
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)
    epochs = pd.read_parquet(exp / "epochs.parquet")
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 1 and trials.status.iloc[0] == "TERMINATED"
    assert sorted(epochs.epoch) == [1, 2, 3, 4], "every epoch reported exactly once"
    first = epochs[epochs.pid == pid]
    after = epochs[epochs.pid != pid]
    assert len(after) >= 1 and after.pid.nunique() == 1, "the trial restarted in a new process"
    done_before = int(first.epoch.max())
    assert (after.resumed_from_epoch == done_before).all(), "it resumed from its last checkpoint"
    assert after.epoch.min() == done_before + 1, "no epoch before the checkpoint was trained again"


def test_a_trial_checkpointing_every_other_epoch_repeats_the_lost_epoch_exactly(tmp_path, tiny_dataset):
    """checkpoint_every=2: killed early in epoch 4, the trial resumes from epoch 2's checkpoint and
    trains epoch 3 again with the same result, then finishes."""
    # 8 draws per image per epoch: epochs of several seconds, so the kill lands inside epoch 4
    study = write_study(tmp_path, num_samples=1, max_epochs=4, extra_fixed="checkpoint_every = 2\npatches_per_image = 8")
    log = tmp_path / "log.txt"
    proc = start(launcher(study, tmp_path, "every2", tiny_dataset.path), log)
    try:
        exp = tmp_path / "every2"

        def after_epoch_three():
            for trial in exp.glob("trial_*"):
                rows = results(trial)
                if rows and rows[-1]["epoch"] >= 3:
                    return trial, rows[-1]["pid"]
            return None

        trial, pid = wait_for(after_epoch_three, 300, "epoch 3 of the trial", proc, log)
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)
    rows = results(trial)  # every report, the lost epoch's included
    first = [r for r in rows if r["pid"] == pid]
    after = [r for r in rows if r["pid"] != pid]
    assert [r["epoch"] for r in first] == [1, 2, 3], "killed before epoch 4 ended"
    assert [r["epoch"] for r in after] == [3, 4]
    assert all(r["resumed_from_epoch"] == 2 for r in after), "resumed from the newest checkpoint, epoch 2's"
    # the repeated epoch is the same epoch: training is seeded per (seed, epoch) and resumes exactly
    assert after[0]["val_srcc"] == first[2]["val_srcc"]
    assert after[0]["train_loss"] == pytest.approx(first[2]["train_loss"], rel=1e-6)
    epochs = pd.read_parquet(exp / "epochs.parquet")
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 1 and trials.status.iloc[0] == "TERMINATED" and trials.stop_epoch.iloc[0] == 4
    assert sorted(epochs.epoch) == [1, 2, 3, 4], "the export keeps one report per epoch"


def test_killed_driver_resumes_without_losing_finished_trials(tmp_path, tiny_dataset):
    """... and MLflow (--mlflow) holds each trial once, with each epoch once, after the resume."""
    import optuna
    from test_mlflow import check_tracked_search

    study = write_study(tmp_path, num_samples=3, max_epochs=3, searcher="optuna", scheduler="none",
                        extra_fixed="patches_per_image = 4")
    log = tmp_path / "log.txt"
    name = "killdriver"
    exp = tmp_path / name
    proc = start(launcher(study, tmp_path, name, tiny_dataset.path, "--max-concurrent", "2", "--mlflow"), log)
    try:
        def one_done_one_running():
            rows = {t.name: results(t) for t in exp.glob("trial_*")}
            done = [t for t, r in rows.items() if r and r[-1]["epoch"] == 3]
            running = [t for t, r in rows.items() if r and r[-1]["epoch"] < 3]
            return (done, running) if done and running else None

        done, _ = wait_for(one_done_one_running, 420, "one finished and one running trial", proc, log)
        time.sleep(1.0)
        before = {t: results(exp / t) for t in done}
        kill_group(proc)  # the driver and the local Ray instance it started, all at once
    finally:
        if proc.poll() is None:
            kill_group(proc)

    resumed_log = tmp_path / "resume.txt"
    resumed = start(launcher(study, tmp_path, name, tiny_dataset.path, "--max-concurrent", "2", "--resume"), resumed_log)
    assert resumed.wait(timeout=600) == 0, resumed_log.read_text()[-3000:]

    trials = pd.read_parquet(exp / "trials.parquet")
    epochs = pd.read_parquet(exp / "epochs.parquet")
    assert trials.trial_id.is_unique and len(trials) == 3, trials[["trial_id", "status"]]
    assert (trials.status == "TERMINATED").all(), trials[["trial_id", "status", "error"]]
    for trial_dir, rows in before.items():  # finished trials keep exactly their results
        tid = rows[-1]["trial_id"]
        mine = epochs[epochs.trial_id == tid].sort_values("epoch")
        assert list(mine.epoch) == [1, 2, 3]
        assert list(mine.val_srcc) == pytest.approx([r["val_srcc"] for r in rows])
        assert mine.pid.nunique() == 1, "a finished trial was not run again"
    assert (epochs.groupby("trial_id").epoch.apply(lambda e: sorted(e) == [1, 2, 3])).all()
    # The searcher kept what it had learned: Optuna's own storage holds every trial's result.
    storage = f"sqlite:///{exp / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    completed = [t for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials
                 if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(completed) == 3
    # The resumed driver logged into the trials' runs from before the kill: one run per trial.
    check_tracked_search(exp)


def test_non_finite_loss_errors_one_trial_and_the_experiment_goes_on(tmp_path, tiny_dataset, shared_ray):
    from iqa_ray.cli.tune import main

    study = write_study(
        tmp_path, num_samples=1, max_epochs=2, searcher="grid",
        extra_params='[params.lr]\nrole = "nuisance"\ntype = "loguniform"\nlow = 1e-4\nhigh = 1e9\ngrid = [1e-3, 1e9]\n',
        extra_fixed="grad_clip = 1e30\npatches_per_image = 4",  # several steps in epoch 0: its second one is NaN
    )
    code = main(launch_flags(study, tmp_path, "nan", tiny_dataset.path))
    assert code == 0
    trials = pd.read_parquet(tmp_path / "nan" / "trials.parquet").set_index("config.lr")
    assert trials.loc[1e-3, "status"] == "TERMINATED" and trials.loc[1e-3, "stop_epoch"] == 2
    bad = trials.loc[1e9]
    assert bad["status"] == "ERROR"
    assert "epoch 0" in bad["error"] and "trial " in bad["error"] and ("nan" in bad["error"] or "inf" in bad["error"])


def test_killed_pregeneration_finishes_on_rerun_without_duplicates(tmp_path):
    out = tmp_path / "data"
    cmd = [PY, str(ROOT / "launch" / "pregenerate.py"), "--engine", "local", "--out", str(out), "--crop-size", "64",
           "--max-short-side", "128", "--max-crops-per-photo", "4", "--per-image", "3", "--crops-per-unit", "1",
           "--distortions", "jpeg", "gaussian_blur", "contrast"]
    log = tmp_path / "log.txt"
    proc = start(cmd, log)
    try:
        wait_for(lambda: len(list(out.glob(".partial-*/shards/*.parquet"))) >= 3, 300, "three shards", proc, log)
        kill_group(proc)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert not [p for p in out.iterdir() if not p.name.startswith(".")], "a killed run leaves nothing that looks done"
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    (done,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    manifest = json.loads((done / "manifest.json").read_text())
    table = pd.concat(pd.read_parquet(done / s["file"]) for s in manifest["shards"])
    assert table.image_id.is_unique
    assert len(table) == sum(r["crops"] for r in manifest["references"]) * 4
    assert not list(done.rglob("*.tmp")) and not list(out.glob(".partial-*"))
