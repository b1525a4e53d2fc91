"""iqa-ray evaluate: the cross-dataset table of a trained model."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from iqa_ray.cli.evaluate import main
from iqa_ray.data.catalog import load_table
from iqa_ray.evaluation.cross_dataset import OUTPUT_CSV, OUTPUT_MD
from iqa_ray.training import inference
from iqa_ray.training.checkpoints import CHECKPOINT_FILE, model_from_checkpoint
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import fit
from iqa_ray.training.loaders import load_decoded, make_loaders

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def tiny_config(dataset) -> TrainConfig:
    return TrainConfig.from_dict({
        "dataset": str(dataset), "family": "mlp", "hidden_dim": 16, "pretrained": "none", "crop_size": 48,
        "eval_patches": 2, "batch_size": 8, "eval_batch_size": 32, "epochs": 1, "lr": 3e-3, "seed": 0,
    })


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory):
    """A one-epoch run on the tiny dataset, saved the way the engine saves (checkpoint.pt)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("run")
        fit(tiny_config(tiny_dataset.path), device="cpu", on_epoch_end=lambda e: e.save(out))
    finally:
        torch.set_num_threads(threads)
    assert (out / CHECKPOINT_FILE).is_file()
    return out


@pytest.fixture(scope="module")
def other_dataset(tiny_config, tmp_path_factory):
    """A second pre-generated dataset (other photos' crops and distortions: another seed)."""
    from iqa_ray.data.pregenerate.run import pregenerate

    return pregenerate(replace(tiny_config, seed=1), tmp_path_factory.mktemp("other"), engine="local").path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def markdown_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header, rule, *body = lines
    assert set(rule.replace("|", "").replace("-", "").replace(":", "")) == set()
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in [header, *body]]
    assert all(len(c) == len(cells[0]) for c in cells)
    return cells


def test_own_test_row_then_other_datasets_scored_whole(run_dir, tiny_dataset, other_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(run_dir), "--dataset", str(other_dataset), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / OUTPUT_MD).read_text()

    rows = read_csv(out / OUTPUT_CSV)
    assert [r["role"] for r in rows] == ["own", "cross"]
    assert [r["split"] for r in rows] == ["test", "all"]
    assert rows[0]["dataset"] == str(tiny_dataset.path) and rows[1]["dataset"] == str(other_dataset)

    model, config = model_from_checkpoint(run_dir, device=CPU)
    own = inference.evaluate_dataset(model, config, str(tiny_dataset.path), split="test", device=CPU)
    table = load_table(str(tiny_dataset.path), label=config.data.label, split_seed=config.data.split_seed)
    assert int(rows[0]["n"]) == own["n"] == int((table["split"] == "test").sum())
    for key in ("srcc", "plcc", "krcc", "rmse"):
        assert float(rows[0][key]) == own[key], key

    whole = inference.evaluate_dataset(model, config, str(other_dataset), device=CPU)
    assert int(rows[1]["n"]) == len(load_table(str(other_dataset))) == whole["n"]
    assert float(rows[1]["srcc"]) == whole["srcc"] and float(rows[1]["plcc"]) == whole["plcc"]

    # The own row independently: the engine's own test loader, predictions, scipy's SRCC.
    loaders = make_loaders(config, load_decoded(config))
    pred, mos = inference.predict(model, loaders.test, CPU)
    assert len(pred) == int(rows[0]["n"])
    assert float(rows[0]["srcc"]) == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
    assert float(rows[0]["plcc"]) == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-12)

    cells = markdown_rows(out / OUTPUT_MD)
    assert cells[0][:5] == ["dataset", "split scored", "n images", "SRCC", "PLCC"]
    assert cells[1][1] == "test" and cells[2][1].startswith("all")
    assert cells[1][2] == rows[0]["n"] and cells[2][2] == rows[1]["n"]
    assert float(cells[1][3]) == pytest.approx(float(rows[0]["srcc"]), abs=5e-5)
    assert "crop_size 48" in printed and "eval_patches 2" in printed


def test_the_models_own_dataset_as_dataset_is_scored_on_test_only(run_dir, tiny_dataset, other_dataset,
                                                                   tmp_path, monkeypatch):
    calls = []
    real = inference.evaluate_dataset

    def spy(model, config, spec, *, split="all", device=None):
        calls.append((spec, split))
        return real(model, config, spec, split=split, device=device)

    monkeypatch.setattr(inference, "evaluate_dataset", spy)
    monkeypatch.chdir(tiny_dataset.path.parent)
    relative = f"{tiny_dataset.path.name}/"  # the same folder, spelled another way
    code = main([str(run_dir), "--dataset", relative, "--dataset", str(other_dataset),
                 "--dataset", str(other_dataset), "--out", str(tmp_path)])
    assert code == 0
    rows = read_csv(tmp_path / OUTPUT_CSV)
    assert [(r["role"], r["split"]) for r in rows] == [("own", "test"), ("cross", "all")]
    assert "scored on its test split only, never whole" in rows[0]["note"]
    assert calls == [(str(tiny_dataset.path), "test"), (str(other_dataset), "all")]  # never the own one whole


def test_default_out_is_the_run_folder_and_a_checkpoint_file_works(run_dir, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(run_dir / CHECKPOINT_FILE, folder / "model.pt")
    assert main([str(folder / "model.pt")]) == 0
    assert (folder / OUTPUT_MD).is_file() and (folder / OUTPUT_CSV).is_file()
    assert len(read_csv(folder / OUTPUT_CSV)) == 1  # no --dataset: the own test row alone
    assert "checkpoint file" in capsys.readouterr().out


def write_experiment(folder: Path, run_dir: Path, best_trial: str | None = "trial_abc12_00001") -> Path:
    """The files a finished search leaves that the evaluation reads (keys as search/run.py writes them)."""
    folder.mkdir()
    (folder / "experiment.json").write_text(json.dumps({"study": "tiny", "metric": "val_srcc", "mode": "max"}))
    for trial in ("trial_abc12_00000", "trial_abc12_00001"):
        (folder / trial).mkdir()
        (folder / trial / "params.json").write_text("{}")
    selected = folder / "trial_abc12_00001"
    (selected / "checkpoint_000000").mkdir()  # an older, emptied checkpoint folder: not the newest
    (selected / "checkpoint_000002").mkdir()
    shutil.copy(run_dir / CHECKPOINT_FILE, selected / "checkpoint_000002" / CHECKPOINT_FILE)
    summary = {"study": "tiny", "experiment": str(folder), "metric": "val_srcc", "mode": "max", "trials": 2,
               "best_trial": best_trial, "best_trial_id": "abc12_00001",
               "best_val": {"srcc": 0.5, "plcc": 0.5, "epoch": 1, "val_srcc": 0.5},
               "test": {"srcc": 0.4, "plcc": 0.4, "n": 10}, "baselines": {}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_an_experiment_folder_evaluates_its_selected_trial(run_dir, tiny_dataset, tmp_path, capsys):
    experiment = write_experiment(tmp_path / "exp", run_dir)
    assert main([str(experiment), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "selected trial trial_abc12_00001" in printed and "checkpoint_000002" in printed
    rows = read_csv(experiment / OUTPUT_CSV)
    model, config = model_from_checkpoint(run_dir, device=CPU)
    own = inference.evaluate_dataset(model, config, str(tiny_dataset.path), split="test", device=CPU)
    assert float(rows[0]["srcc"]) == own["srcc"] and int(rows[0]["n"]) == own["n"]
    assert (experiment / OUTPUT_MD).is_file()


def no_outputs(*folders: Path) -> bool:
    return not any((f / name).exists() for f in folders for name in (OUTPUT_MD, OUTPUT_CSV))


def test_an_experiment_without_summary_or_selected_trial_is_refused(run_dir, tmp_path, capsys):
    unselected = write_experiment(tmp_path / "unselected", run_dir, best_trial=None)
    assert main([str(unselected)]) == 2
    assert "no selected trial" in capsys.readouterr().err
    unfinished = write_experiment(tmp_path / "unfinished", run_dir)
    (unfinished / "summary.json").unlink()
    assert main([str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert "no summary.json yet" in err and str(unfinished) in err
    assert no_outputs(unselected, unfinished)


def test_a_bad_path_exits_2_naming_it_and_the_accepted_forms(tmp_path):
    missing = tmp_path / "nowhere"
    # the real entry point, in a fresh interpreter
    done = subprocess.run([sys.executable, "-m", "iqa_ray", "evaluate", str(missing), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert str(missing) in done.stderr and "experiment folder" in done.stderr and "checkpoint" in done.stderr
    assert done.stdout == "" and not (tmp_path / "o").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert no_outputs(empty)


def test_a_dataset_that_does_not_load_exits_2_with_the_dataset_error_and_writes_nothing(run_dir, other_dataset,
                                                                                         tmp_path, capsys):
    out = tmp_path / "out"
    not_a_dataset = tmp_path / "photos"
    not_a_dataset.mkdir()
    for bad in ("nosuchadapter:/data", str(not_a_dataset), "livec:" + str(tmp_path / "no-livec")):
        assert main([str(run_dir), "--dataset", str(other_dataset), "--dataset", bad, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --dataset ") and repr(bad) in err and "does not load" in err, err
    assert not out.exists() and no_outputs(run_dir)


def test_a_metric_that_is_undefined_prints_as_n_a(run_dir, tmp_path, monkeypatch):
    real = inference.evaluate_dataset

    def constant(model, config, spec, *, split="all", device=None):
        return {**real(model, config, spec, split=split, device=device), "srcc": math.nan}

    monkeypatch.setattr(inference, "evaluate_dataset", constant)
    assert main([str(run_dir), "--out", str(tmp_path)]) == 0
    assert markdown_rows(tmp_path / OUTPUT_MD)[1][3] == "n/a"
    assert np.isnan(float(read_csv(tmp_path / OUTPUT_CSV)[0]["srcc"]))
