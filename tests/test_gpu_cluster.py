"""The launcher's GPU path on a cluster of logical GPUs: nodes that declare GPUs they do not have.

``ray start --num-gpus N`` on this CPU machine gives Ray N GPUs to hand out: trials hold their
share, Ray sets their ``CUDA_VISIBLE_DEVICES``, and torch finds no CUDA. The tests run the real
launcher against such a node (token authentication on, as in tests/test_cluster.py, whose helpers
start and stop it) and check the bookkeeping a GPU search depends on: the share Tune recorded for
each trial, trials packed onto one GPU at once as the share allows, the GPU each trial saw, one note
that the trials found no CUDA and trained on the CPU, the exports, the summary and ``--resume`` as
on CPU; a data-parallel trial over two GPUs on gloo; every GPU free again at the end; and the
refusals before anything starts.

The data is the tiny generated dataset and the cpu recipe (features computed once, a small head
trained on them), so a trial takes seconds; the nodes declare more CPUs than the machine has where a
test needs four trials at once. The trials that must overlap are drawn by the random searcher: with
Optuna, Tune keeps one trial pending at a time (its default for adaptive searchers), so trials of a
few seconds start one after another, each once the previous one's process is up.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time

import pandas as pd
import pytest
from test_cluster import LAUNCH_TIMEOUT_S, QUERY_TIMEOUT_S, _launch, running_cluster

NO_CUDA = "but finds no CUDA, so it trains on the CPU"  # the note (iqa_ray.search.console.device_note)


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    """One node declaring 1 GPU and 4 CPUs (four quarter-GPU trials of 1 CPU fit at once)."""
    with running_cluster(tmp_path_factory.mktemp("data"), [(4, 1)]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory):
    """One node declaring 2 GPUs and 2 CPUs: one data-parallel trial of two workers."""
    with running_cluster(tmp_path_factory.mktemp("data"), [(2, 2)]) as cluster:
        yield cluster


def _search(cluster, tiny_dataset, storage, name: str, *flags: str) -> tuple[str, float]:
    """The launcher on ``cluster`` over the tiny dataset with the cpu recipe; its console and seconds."""
    argv = ("--address", cluster.address, "--recipe", "cpu", "--dataset", str(tiny_dataset.path), "--max-epochs", "1",
            "--no-refit", "--storage", str(storage), "--name", name, *flags)
    proc, elapsed = _launch(*argv, env=cluster.env, timeout=LAUNCH_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    (storage / f"{name}.log").write_text(output)
    assert proc.returncode == 0, output[-6000:]
    return output, elapsed


def _reports(experiment) -> dict[str, list[dict]]:
    """Every trial's reports as Tune wrote them (result.json keeps every key)."""
    return {p.parent.name.removeprefix("trial_"): [json.loads(line) for line in p.read_text().splitlines()]
            for p in experiment.glob("trial_*/result.json")}


def _recorded_resources(experiment) -> dict[str, list[dict]]:
    """Each trial's resource request as Tune recorded it in the experiment state (its bundles)."""
    (state,) = sorted(experiment.glob("experiment_state-*.json"))[-1:]
    out = {}
    for entry in json.loads(state.read_text())["trial_data"]:
        trial = json.loads(entry[0])
        out[trial["trial_id"]] = pickle.loads(bytes.fromhex(trial["placement_group_factory"])).bundles
    return out


def _spans(reports: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """Each trial's (start, end) in seconds since the epoch: its first report less the time it had taken."""
    return {t: (rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]) for t, rows in reports.items()}


_AVAILABLE = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, logging_level="ERROR")
want, deadline = float(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while ray.available_resources().get("GPU", 0.0) < want and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps({k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}))
ray.shutdown()
"""


def _available(cluster, gpus: float, wait_s: float = 30) -> dict[str, float]:
    """The cluster's free CPUs and GPUs, once ``gpus`` GPUs are free or after ``wait_s``."""
    out = subprocess.run([sys.executable, "-c", _AVAILABLE, cluster.address, str(gpus), str(wait_s)], env=cluster.env,
                         capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_trained_on_cpu_with_one_note(output: str, reports: dict[str, list[dict]], experiment) -> dict:
    """Every trial trained on the CPU, the console said so once, and trials.parquet and summary.json
    record it as on CPU; returns summary.json."""
    assert output.count(NO_CUDA) == 1, output[-4000:]
    assert all(r["device"] == "cpu" for rows in reports.values() for r in rows)
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert (trials.status == "TERMINATED").all() and (trials.device == "cpu").all(), trials[["trial_id", "status"]]
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["test"]["srcc"] > 0 and summary["errored_trials"] == 0
    assert summary["devices"]["trials"] == {"cpu": len(reports)}
    assert summary["devices"]["gpu_share_without_cuda"] == sorted(reports)
    return summary


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S + 300)
def test_half_gpu_trials_share_the_gpu_at_once_train_on_the_cpu_and_resume(one_gpu, tiny_dataset, tmp_path):
    output, elapsed = _search(one_gpu, tiny_dataset, tmp_path, "half", "--gpus", "1", "--gpus-per-trial", "0.5",
                              "--num-samples", "2", "--searcher", "random")
    assert "gpus/trial=0.5" in output and "(cluster: 4 CPU, 1 GPU)" in output
    experiment = tmp_path / "half"
    reports = _reports(experiment)
    assert len(reports) == 2
    assert all(bundles == [{"CPU": 1.0, "GPU": 0.5}] for bundles in _recorded_resources(experiment).values())
    spans = _spans(reports)
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), spans  # both at once
    # Ray gave each the GPU, and the trial saw it in CUDA_VISIBLE_DEVICES
    assert all(r["gpu_ids"] == "0" and r["cuda_visible_devices"] == "0" for rows in reports.values() for r in rows)
    summary = _assert_trained_on_cpu_with_one_note(output, reports, experiment)
    assert _available(one_gpu, 1.0)["GPU"] == 1.0

    # --resume of the finished search: nothing is trained again, the summary is the same
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    proc, resumed_s = _launch("--address", one_gpu.address, "--gpus", "1", "--gpus-per-trial", "0.5", "--storage",
                              str(tmp_path), "--name", "half", "--resume", env=one_gpu.env, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    again = pd.read_parquet(experiment / "epochs.parquet")
    assert sorted(again.pid) == sorted(epochs.pid) and len(again) == len(epochs)
    resumed = json.loads((experiment / "summary.json").read_text())
    assert resumed["best_trial_id"] == summary["best_trial_id"] and resumed["devices"] == summary["devices"]
    print(f"\n[gpu cluster] 2 half-GPU trials: launcher {elapsed:.1f} s, --resume {resumed_s:.1f} s; spans {spans}")


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 300)
def test_four_quarter_gpu_trials_run_on_one_gpu_at_once(one_gpu, tiny_dataset, tmp_path):
    output, elapsed = _search(one_gpu, tiny_dataset, tmp_path, "quarter", "--gpus", "1", "--gpus-per-trial", "0.25",
                              "--num-samples", "4", "--searcher", "random", "--trial-scheduler", "none")
    assert "gpus/trial=0.25" in output
    experiment = tmp_path / "quarter"
    reports = _reports(experiment)
    assert len(reports) == 4
    assert all(bundles == [{"CPU": 1.0, "GPU": 0.25}] for bundles in _recorded_resources(experiment).values())
    spans = _spans(reports)
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), spans  # all four at once
    assert all(r["gpu_ids"] == "0" and r["cuda_visible_devices"] == "0" for rows in reports.values() for r in rows)
    _assert_trained_on_cpu_with_one_note(output, reports, experiment)
    assert _available(one_gpu, 1.0)["GPU"] == 1.0
    print(f"\n[gpu cluster] 4 quarter-GPU trials: launcher {elapsed:.1f} s; spans {spans}")


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 300)
def test_a_data_parallel_trial_over_two_gpus_without_cuda_trains_on_gloo(two_gpus, tiny_dataset, tmp_path):
    """Two workers of one GPU each, placed by Ray Train: each saw the node's GPUs, found no CUDA and
    joined a gloo process group. ASHA ends the trial at its last epoch (the trial's processes end at
    once); the workers' placement group is freed all the same, so the test scoring after the search
    gets its GPU and every GPU is free at the end."""
    output, elapsed = _search(two_gpus, tiny_dataset, tmp_path, "ddp", "--gpus", "2", "--gpus-per-trial", "2",
                              "--cpus-per-trial", "2", "--num-samples", "1")
    assert "gpus/trial=2 workers/trial=2" in output
    experiment = tmp_path / "ddp"
    reports = _reports(experiment)
    (rows,) = reports.values()
    for r in rows:
        assert sorted(r["worker_gpu_ids"].split(";")) == ["0", "1"]  # one GPU each
        assert r["process_group"] == "gloo" and r["cuda_visible_devices"] == "0,1" and r["workers"] == 2
    assert "data-parallel workers on gloo" in output
    _assert_trained_on_cpu_with_one_note(output, reports, experiment)
    assert pd.read_parquet(experiment / "trials.parquet").process_group.tolist() == ["gloo"]
    assert _available(two_gpus, 2.0) == {"CPU": 2.0, "GPU": 2.0}
    print(f"\n[gpu cluster] a 2-GPU data-parallel trial: launcher {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_requests_the_cluster_cannot_meet_are_refused_before_anything_starts(one_gpu, tmp_path):
    refused = {
        ("--gpus", "2"): "--gpus 2 asks for more GPUs than the Ray cluster has (1)",
        ("--gpus-per-trial", "2"): "--gpus-per-trial 2 trains each trial data-parallel on 2 GPUs, but the search may use 1",
        ("--gpus-per-trial", "0.3"): "--gpus-per-trial 0.3 does not divide a GPU into whole trials",
    }
    started = time.monotonic()
    for flags, message in refused.items():
        proc, _ = _launch("--address", one_gpu.address, *flags, "--recipe", "cpu", "--smoke-test", "--storage",
                          str(tmp_path), "--name", "refused", env=one_gpu.env, timeout=240)
        assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "refused").exists()
    assert _available(one_gpu, 1.0)["GPU"] == 1.0
    print(f"\n[gpu cluster] three refusals in {time.monotonic() - started:.1f} s")
