"""A normal search prints no crash: no trial actor dies of SIGABRT when Tune stops its trial.

Tune runs a function trainable in a daemon thread of the trial actor. When it stops a trial (ASHA
at a rung, or the last epoch), it wakes that thread inside ``tune.report``, where it raises
``SystemExit``, and lets the actor exit without waiting for it. The thread was still freeing the
trial's tensors; once the interpreter finalizes, its next GIL take is a ``pthread_exit`` that cannot
unwind through torch's ``noexcept`` deallocator, so the actor aborted and its worker log, streamed
to the driver's console, showed "Fatal Python error: Aborted" and "*** SIGABRT received ***" with
about 120 lines of stacks. The results were fine; the console said otherwise.
``iqa_ray.search.cluster.init_ray`` installs a worker setup hook that joins that thread before shutdown.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What an aborting Ray worker prints (faulthandler, Ray's C++ terminate/signal handlers, libstdc++).
CRASH = re.compile(r"Fatal Python error|SIGABRT|terminate called|Aborted \(core dumped\)|TerminateHandler")


def crash_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if CRASH.search(line)]


def run(cmd: list[str], timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_crash_pattern_matches_the_dumps_seen_before_the_fix():
    seen = """\
(iqa_trainable pid=6720) [2026-12-02 10:18:31,530 E 6720 6787] logging.cc:125: Stack trace:
(iqa_trainable pid=6720) /work/main/.venv/lib/python3.11/site-packages/ray/_raylet.so(+0x1815c08) ray::TerminateHandler()
(iqa_trainable pid=6720) *** SIGABRT received at time=1796206711 on cpu 1 ***
(trainable pid=9003) Fatal Python error: Aborted
(iqa_trainable pid=6720) Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/x)
Trial iqa_trainable_3d31ea47 completed after 1 iterations
"""
    found = crash_lines(seen)
    assert len(found) == 3 and not [line for line in found if "Checkpoint" in line or "completed" in line]


# A trial whose frames hold many tensors when Tune stops it: freeing them takes long enough that,
# without the fix, every actor exits in the middle of it (4 of 4 aborted on 2 CPU cores).
STOPPED_TRIALS = """
import torch
from ray import tune
from iqa_ray.search.cluster import init_ray

def trainable(config):
    torch.set_num_threads(1)
    with_graph = [torch.randn(4, requires_grad=True) * 2 for _ in range(config["n"])]
    plain = [torch.zeros(8) for _ in range(config["n"])]
    tune.report({"step": 1.0})  # Tune stops the trial here: SystemExit is raised in this thread
    tune.report({"step": 2.0})

init_ray(num_cpus=2)
tuner = tune.Tuner(trainable, param_space={"n": 20000, "i": tune.grid_search([0, 1, 2, 3])},
                   run_config=tune.RunConfig(stop={"training_iteration": 1}, storage_path=STORAGE, verbose=0))
results = tuner.fit()
assert results.num_errors == 0 and len(results) == 4, results.errors
print("trials finished:", len(results))
"""


@pytest.mark.slow
def test_stopped_trials_exit_without_abort(tmp_path):
    script = tmp_path / "stopped_trials.py"
    script.write_text(f"STORAGE = {str(tmp_path / 'results')!r}\n" + STOPPED_TRIALS)
    rc, out = run([sys.executable, str(script)], timeout=600)
    assert rc == 0, out[-4000:]
    assert "trials finished: 4" in out
    crashes = crash_lines(out)
    assert not crashes, f"{len(crashes)} crash lines on the console, e.g.:\n" + "\n".join(crashes[:20])


@pytest.mark.slow
def test_search_console_has_no_fatal_error(tmp_path, tiny_dataset):
    """A short real search (trials stopped by ASHA at its rung and at the last epoch) prints no crash.

    With ``--verbose``: Ray's own console, where every worker's log is echoed, so a worker's abort
    would show (the default console keeps worker logs in Ray's files).

    The search hands back an ensemble (``--ensemble 3``, issue 36), so the crash check covers the
    members' refit too, and the same search checks the ensemble end to end: selection on the trials'
    reported validation predictions, each member re-trained in refit/, ensemble.json, the test
    scored once, ``load_model`` reading it (one search for both: each costs about two minutes)."""
    rc, out = run([sys.executable, str(ROOT / "launch" / "tune_ranking.py"), "--num-samples", "4", "--max-epochs", "2",
                   "--dataset", str(tiny_dataset.path), "--set", "crop_size=64", "--set", "eval_patches=1",
                   "--cpus-per-trial", "1", "--verbose", "--ensemble", "3", "--storage", str(tmp_path),
                   "--name", "console"], timeout=900)
    assert rc == 0, out[-4000:]
    assert "study ranking: 4 trials (0 errored)" in out, out[-4000:]
    assert "Checkpoint successfully created" in out  # worker logs reached this console
    crashes = crash_lines(out)
    assert not crashes, f"{len(crashes)} crash lines on the console, e.g.:\n" + "\n".join(crashes[:20])
    check_ensemble_handed_back(tmp_path / "console", trials=4, rounds=3, out=out)


def check_ensemble_handed_back(experiment: Path, *, trials: int, rounds: int, out: str) -> None:
    """What a search run with ``--ensemble ROUNDS`` over ``trials`` trials leaves behind (issue 36)."""
    import json

    import numpy as np
    import pandas as pd

    import iqa_ray

    summary = json.loads((experiment / "summary.json").read_text())
    record = summary["ensemble"]
    assert summary["model"] == "ensemble.json" and record["rounds"] == rounds
    assert record["library"] >= 1 and record["library"] + len(record["left_out"]) == trials
    members = record["members"]
    assert sum(m["weight"] for m in members) == pytest.approx(1.0)
    assert record["best_trial"] == summary["best_trial_id"] in {m["trial_id"] for m in members}
    assert record["val_srcc"] >= record["best_trial_val_srcc"] == pytest.approx(summary["best_val"]["srcc"])
    # each member re-trained on training and validation photos, in refit/, and named by the manifest
    every = pd.read_parquet(experiment / "trials.parquet")
    assert (every["kind"] == "refit").sum() == len(members)
    manifest = json.loads((experiment / "ensemble.json").read_text())
    assert [m["model"] for m in manifest["members"]] == [m["model"] for m in members]
    assert all(m["model"].startswith("refit/") for m in members) and summary["refit"]["trials"]
    assert summary["test"] == record["test"] and np.isfinite(record["best_trial_test"]["srcc"])
    assert "ensemble handed back (ensemble.json)" in out and "test SRCC: ensemble" in out
    scorer = iqa_ray.load_model(experiment, device="cpu")
    assert f"{len(members)} members" in repr(scorer)
    photos = list(np.random.default_rng(0).integers(0, 256, size=(2, 96, 128, 3), dtype=np.uint8))
    assert np.isfinite(scorer(photos)).all()
