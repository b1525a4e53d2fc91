"""Every launcher's --smoke-test runs a real (tiny) search end to end, as the Ray Tune examples do in CI.

``launch/tune_ranking.py`` runs as a user runs it, in a fresh interpreter that starts its own Ray
(the console checks need the process's whole output). The other scripts are the same
``iqa_ray.cli.tune.main`` with another study fixed: they run in this process, on the Ray instance
the end-to-end tests share (``shared_ray`` in conftest.py).
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def selected_folder(trials: pd.DataFrame) -> str:
    return trials[trials.selected].trial_dir.iloc[0]


def run_launcher(script: str, argv: list[str], request, capsys) -> SimpleNamespace:
    """``launch/<script> argv``: in a fresh interpreter for tune_ranking.py, else in this process."""
    if script == "tune_ranking.py":
        return subprocess.run([sys.executable, str(ROOT / "launch" / script), *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
    from iqa_ray.cli.tune import main

    request.getfixturevalue("shared_ray")
    study = re.search(r'main\(study="(\w+)"\)', (ROOT / "launch" / script).read_text()).group(1)
    code = main(argv, study=study)
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("tune_ranking.py", []),
    ("tune_gmm.py", []),
    ("tune_schedule.py", []),
    ("tune_efficiency.py", []),  # two objectives: val_srcc and latency_ms, the knee handed back
    # Hub weights need internet, so this runs offline from scratch. Seed 10 makes TPE's two
    # start-up draws efficientnet_lite0 and resnet18: the default seed draws swin_base, which
    # trains at about 1 img/s on CPU and made this one test take 3 minutes of CI.
    ("tune_backbone.py", ["--set", "pretrained=none", "--seed", "10"]),
])
def test_smoke_test_of_every_launcher(tmp_path, script, extra, request, capsys):
    proc = run_launcher(script, ["--smoke-test", "--storage", str(tmp_path), "--name", "smoke", *extra], request, capsys)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "best config (selected on validation" in proc.stdout  # SRCC, or the study's rule over its objectives
    assert "tensorboard --logdir" in proc.stdout
    every = pd.read_parquet(tmp_path / "smoke" / "trials.parquet")
    assert (every.status == "TERMINATED").all()
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    # The model handed back: a refit of the selected config on training and validation photos where
    # it chooses nothing on validation (the cpu recipe), else the selected trial itself.
    refit = (summary.get("refit") or {}).get("trial")
    assert summary["model"] == (refit or selected_folder(every))
    assert set(every.kind) == ({"search", "refit"} if refit else {"search"})
    trials = every[every.kind == "search"]
    assert len(trials) == 2
    # every trial measured its model's cost at the evaluation size (iqa_ray/evaluation/cost.py)
    cost = trials[["params_m", "gflops", "latency_ms", "latency_batch_ms"]]
    assert (cost > 0).all().all(), cost
    assert (trials.latency_batch_size >= 1).all()  # the batch the per-image batched latency was timed at
    selected = trials[trials.selected]
    assert len(selected) == 1
    assert selected.pareto_optimal.all()  # whatever the rule, the trial selected is on the front
    # Trials score validation only; the model handed back is scored on test once, after the search.
    tested = every[every.test_srcc.notna()]
    assert len(tested) == 1
    assert (tested.kind.iloc[0] == "refit") if refit else (tested.trial_id.iloc[0] == selected.trial_id.iloc[0])
    epochs = pd.read_parquet(tmp_path / "smoke" / "epochs.parquet")
    assert not [c for c in epochs.columns if c.startswith("test_")]
    assert summary["best_trial_id"] == selected.trial_id.iloc[0]
    assert tested.test_srcc.iloc[0] == pytest.approx(summary["test"]["srcc"], abs=1e-12)
    # Every summary sets the result beside what a user gets for free on the same test photos.
    baselines = summary["baselines"]
    assert set(baselines) == {"piqe", "brisque", "linear_probe"}
    assert {b["n"] for b in baselines.values()} == {summary["test"]["n"]}
    assert summary["versus_probe"] == pytest.approx(summary["test"]["srcc"] - baselines["linear_probe"]["srcc"])
    assert "baselines on the same" in proc.stdout and "the probe" in proc.stdout
    assert summary["val_test_gap"] == pytest.approx(summary["best_val"]["srcc"] - summary["test"]["srcc"])
    if script == "tune_efficiency.py":  # the front, its values and the rule are in the summary and printed
        front = {row["trial_id"]: row for row in summary["pareto_front"]}
        assert set(front) == set(trials.trial_id[trials.pareto_optimal])
        assert summary["best_trial_id"] in front and summary["selection_rule"].startswith("knee of the front")
        for trial_id, row in front.items():
            assert row["latency_ms"] == pytest.approx(trials.set_index("trial_id").latency_ms[trial_id])
        assert "Pareto front (" in proc.stdout and "<- selected" in proc.stdout
    if script == "tune_ranking.py":  # our console, not Ray's; Ray's lines kept in files
        console = proc.stdout + proc.stderr
        for ray_line in ("Checkpoint successfully created", "logging_progress", "Trial status:", "View detailed results",
                         "Started a local Ray instance", "A new study created"):
            assert ray_line not in console, ray_line
        assert "[search done" in proc.stdout and "kept@epoch" in proc.stdout
        assert all(f"trial {tid} " in proc.stdout for tid in trials.trial_id)
        assert "features (efficientnet_lite0): 100%" in proc.stderr and "decoding: 100%" in proc.stderr
        driver_log = (tmp_path / "smoke" / "driver.log").read_text()
        assert "Started a local Ray instance" in driver_log and "A new study created" in driver_log
    if script == "tune_ranking.py":  # the figure is the handed-back checkpoint's kept weights on the test split
        from iqa_ray.training.checkpoints import model_from_checkpoint
        from iqa_ray.training.inference import evaluate
        from iqa_ray.training.loaders import load_decoded, make_loaders

        model, config = model_from_checkpoint(tmp_path / "smoke" / tested.checkpoint_path.iloc[0])
        assert config.optim.train_on_val is bool(refit)
        test = evaluate(model, make_loaders(config, load_decoded(config)).test, torch.device("cpu"))
        assert test["srcc"] == pytest.approx(summary["test"]["srcc"], abs=1e-6)
    assert (tmp_path / "smoke" / "experiment.json").exists() and (tmp_path / "smoke" / "summary.json").exists()
    if script == "tune_backbone.py":  # each backbone's LR was drawn inside that backbone's own range
        import tomllib

        ranges = tomllib.loads((ROOT / "search_spaces" / "backbone.toml").read_text())["params"]["lr"]["range_by"]["backbone"]
        for backbone, lr in zip(trials["config.backbone"], trials["config.lr"]):
            low, high = ranges[backbone]
            assert low <= lr <= high, (backbone, lr, ranges[backbone])
