#!/usr/bin/env python
"""Load: a search of many very short trials; driver memory and what is left behind.

Runs N trials (default 200) of a tiny model (a 2-layer MLP on random data, a few SGD steps, two
reports with a checkpoint each) through Ray Tune with the same run settings as the launcher
(one checkpoint kept per trial, experiment snapshots, a TensorBoard logger) and records the
driver's resident memory after trial 20 and after trial N (Ray issue 64231 reported linear
growth with the trial count). After the search and ``ray.shutdown()`` it checks that no
placement group is left and no Ray process of this run survives.

    python benchmarks/load_trials.py [--trials 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tiny_trainable(config: dict) -> None:
    import torch
    from ray import tune

    torch.manual_seed(config["seed"])
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for step in range(2):
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with tempfile.TemporaryDirectory() as d:
            torch.save(model.state_dict(), Path(d) / "model.pt")
            tune.report({"loss": float(loss), "val_srcc": -float(loss)}, checkpoint=tune.Checkpoint.from_directory(d))


class MemoryProbe:
    """A Tune callback that records the driver's RSS as trials complete."""

    def __init__(self, marks: tuple[int, ...]) -> None:
        from ray.tune import Callback

        probe = self
        self.marks = set(marks)
        self.samples: dict[int, float] = {}
        self.completed = 0

        class _CB(Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
                probe.completed += 1
                if probe.completed in probe.marks or probe.completed % 50 == 0:
                    probe.samples[probe.completed] = psutil.Process().memory_info().rss / 2**20

        self.callback = _CB()


def ray_processes(session_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if session_dir and session_dir in cmd:
            found.append(proc)
    return found


def run(trials: int, storage: str) -> dict:
    import ray
    from ray import tune

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    # This file is a script, not part of the installed package: ship the trainable by value so
    # Ray workers need not import it (the tests import it from benchmarks/).
    ray.cloudpickle.register_pickle_by_value(sys.modules[tiny_trainable.__module__])
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    probe = MemoryProbe((20, trials))
    start = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(tiny_trainable, {"cpu": 1}),
        param_space={"lr": tune.loguniform(1e-4, 1e-1), "seed": tune.randint(0, 10_000)},
        tune_config=tune.TuneConfig(num_samples=trials, metric="val_srcc", mode="max", reuse_actors=True),
        run_config=tune.RunConfig(name="load", storage_path=storage, verbose=0, callbacks=[probe.callback],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    grid = tuner.fit()
    elapsed = time.perf_counter() - start
    finished = sum(1 for r in grid if r.error is None and r.metrics)
    from ray.util.placement_group import placement_group_table

    leftover_pgs = [pg for pg in placement_group_table().values() if pg.get("state") not in ("REMOVED",)]
    ray.shutdown()
    time.sleep(3)
    survivors = ray_processes(session_dir)
    return {"trials": trials, "finished": finished, "errored": sum(1 for r in grid if r.error is not None),
            "elapsed_s": round(elapsed, 1), "trials_per_s": round(trials / elapsed, 2),
            "driver_rss_mb": {str(k): round(v, 1) for k, v in sorted(probe.samples.items())},
            "placement_groups_left": len(leftover_pgs), "ray_processes_left": [p.pid for p in survivors]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with tempfile.TemporaryDirectory() as storage:
        result = run(args.trials, storage)
    result.update({"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
                   "date": time.strftime("%Y-%m-%d")})
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
