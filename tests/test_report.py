"""``iqa-ray report``: which notebooks apply, and bad input named before anything runs (the
notebooks themselves run in the slow tests of tests/test_notebooks.py)."""

import json

import pandas as pd

from iqa_ray.cli import main as iqa_ray_main
from iqa_ray.cli.report import chosen_notebooks


def experiment(tmp_path, study):
    tmp_path.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"trial_id": ["a"]}).to_parquet(tmp_path / "trials.parquet")
    (tmp_path / "experiment.json").write_text(json.dumps({"study": study}))
    return tmp_path


def test_the_ranking_notebook_applies_to_ranking_studies_only(tmp_path):
    assert chosen_notebooks(experiment(tmp_path / "r", "ranking"), None) == [
        "ranking_study", "hyperparameters", "family_comparison", "run_report"]
    assert "ranking_study" not in chosen_notebooks(experiment(tmp_path / "g", "gmm"), None)


def test_bad_input_is_named_and_writes_nothing(tmp_path, capsys):
    assert iqa_ray_main(["report", str(tmp_path / "missing")]) == 2
    assert "no such experiment folder" in capsys.readouterr().err
    assert iqa_ray_main(["report", str(tmp_path)]) == 2
    assert "holds no trials.parquet" in capsys.readouterr().err
    exp = experiment(tmp_path / "e", "ranking")
    assert iqa_ray_main(["report", str(exp), "--notebooks", "ranking_study", "nope"]) == 2
    assert "unknown notebook(s) nope; valid: ranking_study, hyperparameters" in capsys.readouterr().err
    assert not (exp / "report").exists()
