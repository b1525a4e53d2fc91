"""Data-parallel trials: the engine's DDP path, the Ray Train trainable inside Tune, the launcher's checks.

A data-parallel run draws the single-process global batch on every worker and keeps its share;
each share's mean loss is weighted by its size and DistributedDataParallel averages the shares'
gradients, so with a loss that is a mean over the batch (``l1`` here) and no batch statistics in
training (a frozen backbone) and no dropout (each share draws its own masks: the same
distribution, other draws), every step is the single-process step up to float summation order
(a sum of two halves instead of one sum: ~1e-7 relative per step in float32).

TOLERANCE: 1e-3 (absolute and relative) on train loss, val SRCC/PLCC/RMSE after 2-3 epochs. The
float-order differences stay near 1e-6 over a few dozen Adam steps; SRCC is a rank statistic, so
such a difference can only move it if it swaps two predictions closer than that, which on the
tiny validation split moves SRCC by 1/n^2-ish steps (~1e-4). 1e-3 is an order of magnitude above
what the order of summation can do and far below what a wrong gradient (not averaged, or
summed: 2x the step) moves in these metrics (>1e-2 after one epoch).
"""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch

from iqa_ray.core.options import ConfigError
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import fit
from iqa_ray.training.loaders import load_decoded
from iqa_ray.training.parallel import DataParallel, check_data_parallel

# Metrics of a 2-worker run against the 1-worker run of the same config, seed and global batch.
TOLERANCE = 1e-3
COMPARED = ("train_loss", "val_srcc", "val_plcc", "val_rmse")


# dropout 0 in both: each process would draw its own share's masks (random either way, not the same draws).
def cached(tiny_dataset, **kw):
    base = {"dataset": str(tiny_dataset.path), "crop_size": 32, "whole_image": True, "feature_cache": True,
            "family": "mlp", "pooling": "stages", "frozen_backbone": True, "pretrained": "offline",
            "hidden_dim": 32, "batch_size": 8, "epochs": 3, "lr": 3e-3, "patches_per_image": 2, "amp": False,
            "dropout": 0.0}
    base.update(kw)
    return TrainConfig.from_dict(base)


def images(tiny_dataset, **kw):
    # A frozen backbone: a trained BatchNorm would normalise each share by its own statistics.
    base = {"dataset": str(tiny_dataset.path), "crop_size": 48, "batch_size": 8, "eval_batch_size": 32,
            "epochs": 2, "lr": 3e-3, "family": "mlp", "pretrained": "offline", "hidden_dim": 32, "amp": False,
            "frozen_backbone": True, "dropout": 0.0}
    base.update(kw)
    return TrainConfig.from_dict(base)


def assert_same_metrics(one: list[dict], two: list[dict]) -> None:
    assert [h["epoch"] for h in one] == [h["epoch"] for h in two]
    for a, b in zip(one, two):
        for key in COMPARED:
            assert math.isclose(a[key], b[key], rel_tol=TOLERANCE, abs_tol=TOLERANCE), (a["epoch"], key, a[key], b[key])


# ----------------------------------------------------------------------------- engine (no Ray)


def test_a_share_is_every_world_size_th_element_and_shares_cover_the_batch():
    batch = torch.arange(10)
    shares = [DataParallel(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert shares[0].tolist() == [0, 3, 6, 9] and shares[2].tolist() == [2, 5, 8]
    assert sorted(torch.cat(shares).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="rank"):
        DataParallel(rank=2, world_size=2)


def test_a_batch_smaller_than_the_worker_count_is_refused_naming_batch_size(tiny_dataset):
    config = cached(tiny_dataset, batch_size=2)
    with pytest.raises(ConfigError, match="batch_size 2 .* 3 data-parallel workers"):
        check_data_parallel(DataParallel(rank=0, world_size=3), config, n_train_images=50)


def test_data_parallel_without_a_process_group_is_refused(tiny_dataset):
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        check_data_parallel(DataParallel(rank=0, world_size=2), cached(tiny_dataset), n_train_images=50)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit_rank(rank: int, world: int, port: int, config_dict: dict, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        config = TrainConfig.from_dict(config_dict)
        result = fit(config, load_decoded(config), device="cpu", score_test=False,
                     data_parallel=DataParallel(rank=rank, world_size=world))
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result.history, f)
        torch.save(result.model.state_dict(), f"{out}.{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_processes(config: TrainConfig, tmp_path, world: int = 2) -> list[tuple[list[dict], dict]]:
    import torch.multiprocessing as mp

    out = str(tmp_path / "history")
    # fork: the children inherit the imported modules (a spawned child would re-import the test module)
    mp.start_processes(_fit_rank, args=(world, _free_port(), config.flat(), out), nprocs=world, start_method="fork")
    return [(json.loads(open(f"{out}.{r}").read()), torch.load(f"{out}.{r}.pt")) for r in range(world)]


def assert_same_weights(one: dict, other: dict, tol: float = 1e-4) -> None:
    assert one.keys() == other.keys()
    for key in one:
        assert torch.allclose(one[key].float(), other[key].float(), rtol=tol, atol=tol), key


@pytest.mark.parametrize("make", [cached, images], ids=["cached_features", "images"])
def test_two_processes_train_as_one_does_on_the_same_global_batch(tiny_dataset, tmp_path, make, one_torch_thread):
    config = make(tiny_dataset)
    single = fit(config, load_decoded(config), device="cpu", score_test=False)
    alone = single.history
    (rank0, weights0), (rank1, weights1) = _run_processes(config, tmp_path)
    assert_same_metrics(alone, rank0)
    # The averaged gradient is the one-process gradient of the whole batch: the same weights.
    assert_same_weights(single.model.state_dict(), weights0)
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0), "the processes hold the same weights"
    # Both ranks report the global train metrics and evaluate the same (identical) weights.
    assert [h["train_loss"] for h in rank0] == [h["train_loss"] for h in rank1]
    assert [h["val_srcc"] for h in rank0] == [h["val_srcc"] for h in rank1]
    assert rank0[-1]["train_loss"] < rank0[0]["train_loss"]


def test_unequal_shares_still_step_on_the_global_batch_mean(tiny_dataset, tmp_path, one_torch_thread):
    """batch 7 over 2 processes: shares of 4 and 3. Weighting each share's mean loss by its size makes
    DDP's average the gradient of the 7-image mean (an unweighted average of the two means is not)."""
    config = cached(tiny_dataset, batch_size=7, epochs=2)
    single = fit(config, load_decoded(config), device="cpu", score_test=False)
    (rank0, weights0), _ = _run_processes(config, tmp_path)
    assert_same_metrics(single.history, rank0)
    assert_same_weights(single.model.state_dict(), weights0)


# ----------------------------------------------------------------------------- launcher (no Ray)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--workers-per-trial", "0"], r"--workers-per-trial must be a whole number >= 1 .*got 0"),
        (["--workers-per-trial", "-2"], r"--workers-per-trial must be a whole number >= 1"),
        (["--workers-per-trial", "1.5"], r"--workers-per-trial must be a whole number >= 1 \(1 = an ordinary trial.*got 1.5"),
        (["--gpus-per-trial", "1.5"], r"--gpus-per-trial must be in \(0, 1\] .* or a whole number .*got 1.5"),
        (["--gpus-per-trial", "2.5"], r"a whole\s+number of GPUs above 1 .*\(2, 3, 4, \.\.\.\).*got 2.5"),
        (["--gpus-per-trial", "2", "--workers-per-trial", "2"], r"--workers-per-trial N is for CPU workers"),
        (["--gpus", "0", "--gpus-per-trial", "2"], r"--gpus 0"),
    ],
)
def test_bad_data_parallel_flags_name_the_flag_and_the_valid_values(argv, match, capsys):
    import re

    from iqa_ray.cli.tune import main

    assert main(argv, study="ranking") == 2
    assert re.search(match, capsys.readouterr().err, re.S)



def _settings(**kw):
    from iqa_ray.cli.tune import build_parser
    from iqa_ray.search.settings import settings_from_args

    argv = [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return settings_from_args(build_parser("ranking").parse_args(argv), "ranking")


def test_workers_that_the_cluster_cannot_place_are_refused_and_concurrency_is_capped():
    from dataclasses import replace

    from iqa_ray.core.errors import LaunchError
    from iqa_ray.search.cluster import check_data_parallel_fits, cpus_per_worker, trial_workers

    two = _settings(workers_per_trial=2, cpus_per_trial=2)
    assert trial_workers(two) == 2 and cpus_per_worker(two) == 1.0
    assert check_data_parallel_fits(two, [2.0], 0.0) == 1  # this machine: one 2-worker trial at a time
    assert check_data_parallel_fits(two, [4.0, 4.0], 0.0) == 4
    assert check_data_parallel_fits(replace(two, max_concurrent=2), [4.0, 4.0], 0.0) == 2
    with pytest.raises(LaunchError, match=r"--workers-per-trial 4 needs 4 workers of 1 CPU each.*can place 2"):
        check_data_parallel_fits(replace(two, workers_per_trial=4), [2.0], 0.0)
    gpu = replace(_settings(cpus_per_trial=4), gpus_per_trial=2.0)
    assert trial_workers(gpu) == 2 and check_data_parallel_fits(gpu, [16.0], 4.0) == 2
    with pytest.raises(LaunchError, match=r"--gpus-per-trial 2 asks for 2 GPUs per trial but the search may use 1"):
        check_data_parallel_fits(gpu, [16.0], 1.0)
    assert trial_workers(_settings()) == 1


# ----------------------------------------------------------------------------- Tune + Ray Train (slow)

DDP_STUDY = """
[study]
description = "tiny study for data-parallel tests"
num_samples = 1
max_epochs = {max_epochs}
grace_period = 1
searcher = "random"
trial_scheduler = "none"

[fixed]
family = "mlp"
hidden_dim = 16
crop_size = 64
eval_patches = 1
batch_size = 32
frozen_backbone = true
dropout = 0.0
{extra_fixed}

[params.lr]
role = "scientific"
type = "loguniform"
low = 0.001
high = 0.003
grid = [0.002]
"""


def _argv(tmp_path, name: str, dataset, *extra: str, max_epochs: int = 3, extra_fixed: str = "") -> list[str]:
    """The launcher's flags for the tiny data-parallel study over ``dataset`` (``None``: the embedded one)."""
    study = tmp_path / "ddp.toml"
    study.write_text(DDP_STUDY.format(max_epochs=max_epochs, extra_fixed=extra_fixed))
    return ["--study", str(study), *(["--dataset", str(dataset)] if dataset else []), "--storage", str(tmp_path),
            "--name", name, "--cpus-per-trial", "2", *extra]


def _launch(tmp_path, name: str, dataset, *extra: str, max_epochs: int = 3, extra_fixed: str = "",
            env: dict[str, str] | None = None):
    """The launcher in a fresh interpreter (a test that kills one of its processes, or sets ``env`` for
    the Ray instance it starts), and its log."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "launch" / "tune.py"),
           *_argv(tmp_path, name, dataset, *extra, max_epochs=max_epochs, extra_fixed=extra_fixed)]
    log = tmp_path / f"{name}.log"
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=root,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True), log


def _reports(experiment) -> list[dict]:
    """Every report of the experiment's one trial, as Tune wrote them (result.json keeps every key;
    the export keeps its own columns, not ``workers`` / ``worker_pids``)."""
    (trial,) = experiment.glob("trial_*")
    path = trial / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_two_worker_trial_reports_what_a_one_worker_trial_does(tmp_path, capsys, shared_ray):
    """The same search (one trial, the seeded searcher draws the same lr) with 2 gloo workers and with
    one process: every epoch's train loss and validation metrics agree within TOLERANCE (see the
    module's docstring), and the trial is an ordinary one to Tune, the export and the summary."""
    import pandas as pd

    from iqa_ray.cli.tune import main

    runs, printed = {}, {}
    for name, extra in (("two", ("--workers-per-trial", "2")), ("one", ())):
        # the embedded dataset: enough photos that 3 epochs learn something (test SRCC > 0 below)
        code = main(_argv(tmp_path, name, None, *extra), prog="launch/tune.py", require_study=True)
        printed[name] = capsys.readouterr().out
        assert code == 0, printed[name][-3000:]
        runs[name] = pd.read_parquet(tmp_path / name / "epochs.parquet").sort_values("epoch")
        trials = pd.read_parquet(tmp_path / name / "trials.parquet")
        assert len(trials) == 1 and trials.status.iloc[0] == "TERMINATED"
        assert json.loads((tmp_path / name / "summary.json").read_text())["test"]["srcc"] > 0
    two, one = runs["two"], runs["one"]
    assert "workers/trial=2" in printed["two"]
    reports = _reports(tmp_path / "two")
    assert [r["workers"] for r in reports] == [2, 2, 2]
    # the model's cost, measured once by rank 0 on its device, as an ordinary trial does
    cost = pd.read_parquet(tmp_path / "two" / "trials.parquet")[["params_m", "gflops", "latency_ms", "latency_batch_ms"]]
    assert (cost > 0).all().all(), cost
    assert cost.params_m.iloc[0] == pytest.approx(pd.read_parquet(tmp_path / "one" / "trials.parquet").params_m.iloc[0])
    assert all(len(set(r["worker_pids"].split(","))) == 2 for r in reports)
    assert list(two.epoch) == list(one.epoch) == [1, 2, 3]
    assert_same_metrics(one.to_dict("records"), two.to_dict("records"))
    assert two.train_loss.iloc[-1] < two.train_loss.iloc[0]
    assert list((tmp_path / "two").glob("trial_*/checkpoint_*")), "the trial's checkpoint is Tune's, as usual"
    assert not list((tmp_path / "two").glob("trial_*/ddp")), "Ray Train's copy is removed once Tune holds it"


@pytest.mark.slow
def test_a_killed_worker_resumes_the_trial_from_its_checkpoint(tmp_path, tiny_dataset):
    """SIGKILL of rank 1 inside epoch 3: Ray Train restarts both workers from the newest checkpoint,
    the trial finishes, and every epoch reaches Tune exactly once."""
    import os
    import signal
    import time

    import pandas as pd

    # 16 draws per image of the tiny dataset: epochs of a few seconds, so the kill lands inside one
    proc, log = _launch(tmp_path, "kill", tiny_dataset.path, "--workers-per-trial", "2", max_epochs=4,
                        extra_fixed="patches_per_image = 16")
    exp = tmp_path / "kill"
    try:
        deadline = time.monotonic() + 150
        seen = None
        while seen is None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            for trial in exp.glob("trial_*"):
                path = trial / "result.json"
                rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
                if rows and rows[-1]["epoch"] >= 2 and list(trial.glob("checkpoint_*")):
                    seen = rows[-1]
            time.sleep(0.3)
        assert seen is not None, "epoch 2 never came: " + log.read_text()[-3000:]
        pids = [int(p) for p in seen["worker_pids"].split(",")]
        time.sleep(1.0)  # inside epoch 3 now
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    epochs = pd.read_parquet(exp / "epochs.parquet").sort_values("epoch")
    trials = pd.read_parquet(exp / "trials.parquet")
    assert len(trials) == 1 and trials.status.iloc[0] == "TERMINATED"
    assert list(epochs.epoch) == [1, 2, 3, 4], "every epoch exported exactly once"
    reports = _reports(exp)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4], "every epoch reached Tune exactly once"
    first = [r for r in reports if r["worker_pids"] == seen["worker_pids"]]
    after = [r for r in reports if r["worker_pids"] != seen["worker_pids"]]
    assert after and len({r["worker_pids"] for r in after}) == 1, "a new worker group finished the trial"
    assert str(pids[1]) not in after[0]["worker_pids"].split(",")
    done_before = first[-1]["epoch"]
    assert all(r["resumed_from_epoch"] == done_before for r in after), "it resumed from the newest checkpoint"
    assert after[0]["epoch"] == done_before + 1


NO_INTERFACE = "iqa-ray-no-such-interface"  # a GLOO_SOCKET_IFNAME no machine has: gloo cannot start, every time


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_a_trial_whose_process_group_never_starts_ends_the_search_with_its_error(tmp_path, tiny_dataset):
    """Every worker fails the same way (gloo finds no network interface of that name): Ray Train
    retries the worker group and gives up, Tune retries the trial once (--max-failures 1) and ends it
    as ERROR, and the launcher exits with the error named. Before issue 38 the first failure left the
    worker group's placement group held and the retry waited for it forever (the launcher was killed
    at the limit below)."""
    import os
    import signal
    import subprocess
    import time

    started = time.monotonic()
    proc, log = _launch(tmp_path, "nogloo", tiny_dataset.path, "--workers-per-trial", "2", "--max-failures", "1",
                        max_epochs=1, env={"GLOO_SOCKET_IFNAME": NO_INTERFACE})
    try:
        code = proc.wait(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        pytest.fail(f"the search did not end within 480 s (it hangs): {log.read_text()[-3000:]}")
    elapsed = time.monotonic() - started
    text = log.read_text()
    assert code == 2, text[-4000:]
    assert "error: no trial reported any epoch (1 errored)" in text
    assert text.count("will be retried from its last checkpoint") == 1  # --max-failures 1: one retry
    (line,) = [x for x in text.splitlines() if " ERROR at epoch 0: " in x]
    assert f"Unable to find address for: {NO_INTERFACE}" in line, line
    print(f"\n[ddp] a process group that never starts ended the search in {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_run_watcher_frees_the_workers_placement_group_once_the_controller_is_gone(shared_ray):
    """trainables/worker_group.py: the watcher removes a run's placement group when its controller
    dies (as when Tune ends the trial), not while the controller is only busy; after a clean shutdown
    (finish) it exits, leaving the controller and its removed group alone."""
    import time

    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from iqa_ray.trainables.worker_group import RunWatcher

    @ray.remote(num_cpus=0)
    class Controller:
        def busy(self, seconds: float) -> bool:
            time.sleep(seconds)
            return True

    def state(group) -> str:
        return placement_group_table(group)["state"]

    def run() -> tuple:
        controller, group = Controller.remote(), placement_group([{"CPU": 0.01}])
        ray.get(group.ready(), timeout=60)
        watcher = ray.remote(RunWatcher).options(num_cpus=0, max_concurrency=2).remote(controller)
        ray.get(watcher.add.remote(group))
        return controller, group, watcher, watcher.watch.remote(0.2)

    controller, group, watcher, watching = run()
    ray.get(controller.busy.remote(2.0))  # unanswered checks for 2 s: busy, not gone
    assert state(group) == "CREATED"
    ray.kill(controller)
    with pytest.raises(ray.exceptions.RayActorError):  # the watcher exits once it has cleaned up
        ray.get(watching, timeout=60)
    assert state(group) == "REMOVED"

    controller, group, watcher, watching = run()
    remove_placement_group(group)  # a clean shutdown: the controller removes its group, then says so
    watcher.finish.remote()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(watching, timeout=60)
    assert ray.get(controller.busy.remote(0.0)) and state(group) == "REMOVED"
