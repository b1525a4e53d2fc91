"""Recipes (recipes/*.toml) beside studies, the --recipe / --splits flags, and the N-split helpers."""

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iqa_ray.cli.tune import build_parser, main
from iqa_ray.core.errors import LaunchError
from iqa_ray.core.paths import bundled_datasets_dir
from iqa_ray.search.recipe import (
    apply_recipe,
    available_recipes,
    default_recipe,
    load_recipe,
    parse_recipe,
    resolve_recipe,
)
from iqa_ray.search.retrain import probe_on_splits, split_columns, split_seeds, summarise_values
from iqa_ray.search.settings import resume_settings, settings_from_args
from iqa_ray.search.study import StudyError
from iqa_ray.search.study_file import load_study
from iqa_ray.training.config import TrainConfig

LIVEC = bundled_datasets_dir() / "livec"  # the 627 human-rated photos that ship with the repository


def parse(*argv, study="ranking"):
    return build_parser(study).parse_args(list(argv))


def test_the_built_in_recipes_load_and_set_what_their_protocol_fixes():
    assert {"cpu", "paper"} <= set(available_recipes())
    cpu, paper = load_recipe("cpu"), load_recipe("paper")
    assert cpu.fixed["feature_cache"] and cpu.fixed["frozen_backbone"] and cpu.fixed["whole_image"]
    assert paper.fixed["backbone"] == "resnet50" and paper.fixed["patches_per_image"] == 25
    assert paper.fixed["eval_patches"] == 25 and paper.fixed["patch_placement"] == "random"
    assert paper.splits == 10 and paper.budget["max_epochs"] == 16
    assert paper.values_for("livec:/data/livec")["image_size"] == [500, 500]
    assert paper.values_for("koniq:/data/koniq")["image_size"] == [512, 384]  # an alias finds its adapter
    assert paper.values_for("spaq:/data/spaq")["short_side"] == 512
    # Pre-generated data has its own split and sizes: real-dataset keys do not apply.
    assert "split_fractions" not in paper.values_for("embedded")


def test_every_value_in_a_recipe_file_has_a_comment_citing_its_source():
    for name in available_recipes():
        text = (Path(__file__).resolve().parents[1] / "recipes" / f"{name}.toml").read_text()
        in_values, block_cited = False, False
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("["):
                in_values, block_cited = stripped.startswith(("[fixed]", "[dataset.", "[study]")), False
            elif not stripped:
                block_cited = False  # a comment covers the lines right under it, up to a blank line
            elif stripped.startswith("#"):
                block_cited = True
            elif in_values:
                assert "#" in line or block_cited, f"recipes/{name}.toml: no source for {stripped!r}"


def test_applying_the_cpu_recipe_keeps_searched_keys_searched_and_drops_foreign_family_keys():
    study = load_study("ranking")
    applied = apply_recipe(load_recipe("cpu"), study, "livec:/data/livec")
    assert {p.name for p in applied.study.params} == {"alpha", "margin", "lr"}
    assert applied.study.fixed["family"] == "mlp"
    assert "multiscale" in applied.dropped and "multiscale" not in applied.study.fixed
    assert applied.study.num_samples == 16 and applied.study.max_epochs == 20
    text = "\n".join(applied.describe())
    assert "recipe     feature_cache = True" in text and "dropped    multiscale" in text
    record = json.loads(json.dumps(applied.record()))
    assert record["name"] == "cpu" and record["applied"]["pooling"] == "every_block"


def test_a_recipe_value_for_a_searched_key_is_reported_not_applied(tmp_path):
    recipe = parse_recipe({"recipe": {"description": "x"}, "fixed": {"lr": 1e-2, "crop_size": 96}}, name="mine")
    applied = apply_recipe(recipe, load_study("ranking"), "embedded")
    assert applied.searched == {"lr": 1e-2} and applied.applied == {"crop_size": 96}
    assert "searched   lr" in "\n".join(applied.describe())


@pytest.mark.parametrize("data, match", [
    ({"fixed": {"no_such_key": 1}}, "not config keys"),
    ({"fixed": {"patches_per_image": 0}}, "patches_per_image"),
    ({"fixed": {"epochs": 3}}, "max_epochs"),
    ({"study": {"searcher": "grid"}}, "only the budget"),
    ({"recipe": {"splits": -1}}, "splits"),
    ({"dataset": {"livec": {"image_size": [8, 8]}}}, r"\[dataset.livec\]"),
    ({"extra": {}}, "unknown tables"),
])
def test_bad_recipe_files_are_refused_naming_the_table_and_key(data, match):
    with pytest.raises(StudyError, match=match):
        parse_recipe(data, name="bad")


def test_the_default_recipe_is_cpu_without_a_gpu_and_paper_with_one():
    assert default_recipe(0) == "cpu"
    assert default_recipe(2) == "paper"
    assert default_recipe(None) in ("cpu", "paper")


def test_a_default_recipe_that_cannot_serve_the_study_is_set_aside_with_a_note_an_explicit_one_is_an_error():
    recipe, note = resolve_recipe(None, 0, load_study("gmm"), "embedded")
    assert recipe is None and "n_clusters" in note and "runs as written" in note
    with pytest.raises(StudyError, match="n_clusters"):
        resolve_recipe("cpu", 0, load_study("gmm"), "embedded")
    recipe, note = resolve_recipe(None, 0, load_study("backbone"), "embedded")
    assert recipe is None and "backbone" in note
    assert resolve_recipe("none", 0, load_study("ranking"), "embedded") == (None, None)


def test_set_overrides_a_recipe_value_and_the_launch_records_the_recipe():
    s = settings_from_args(parse("--gpus", "0", "--set", "hidden_dim=64"), "ranking")
    assert s.recipe["name"] == "cpu"
    assert s.effective_study.fixed["hidden_dim"] == 64
    assert TrainConfig.from_dict(s.effective_study.constants()).model.hidden_dim == 64
    assert any(line.startswith("recipe cpu") for line in s.recipe_lines)
    plain = settings_from_args(parse("--recipe", "none"), "ranking")
    assert plain.recipe is None and plain.effective_study.fixed["family"] == "hyperiqa"


def test_the_paper_recipe_offline_fails_before_ray_naming_the_weights(monkeypatch, capsys):
    monkeypatch.setattr("iqa_ray.core.net.hub_reachable", lambda *a, **k: (False, "no network (test)"))
    assert main(["--recipe", "paper"], study="ranking") == 2
    err = capsys.readouterr().err
    assert "hub" in err and "pretrained=" in err


def test_splits_on_data_without_a_seeded_split_is_refused():
    with pytest.raises(LaunchError, match="--splits"):
        settings_from_args(parse("--splits", "3", "--dataset", "embedded"), "ranking")
    assert main(["--splits", "-1"], study="ranking") == 2


def test_resume_re_applies_the_recorded_recipe_and_refuses_another(tmp_path):
    from iqa_ray.search.run import write_experiment_info

    args = parse("--gpus", "0", "--name", "rec", "--storage", str(tmp_path), "--set", "hidden_dim=64")
    s = settings_from_args(args, "ranking")
    s.local_experiment_dir().mkdir(parents=True)
    write_experiment_info(s, args)
    again = resume_settings(parse("--resume", "--name", "rec", "--storage", str(tmp_path)), "ranking")
    assert again.effective_study.fixed == s.effective_study.fixed and again.recipe == s.recipe
    with pytest.raises(LaunchError, match="--recipe"):
        resume_settings(parse("--resume", "--name", "rec", "--storage", str(tmp_path), "--recipe", "paper"), "ranking")


@pytest.mark.parametrize("flag, key", [("--splits-train-only", "splits_train_on_val"), ("--no-refit", "refit")])
def test_a_train_on_val_opt_out_is_recorded_and_a_resume_keeps_it_or_refuses_it(tmp_path, flag, key):
    from iqa_ray.search.run import write_experiment_info

    assert getattr(settings_from_args(parse("--gpus", "0"), "ranking"), key) is True
    args = parse("--gpus", "0", "--name", "kept", "--storage", str(tmp_path), flag)
    s = settings_from_args(args, "ranking")
    assert getattr(s, key) is False
    s.local_experiment_dir().mkdir(parents=True)
    write_experiment_info(s, args)
    assert json.loads((s.local_experiment_dir() / "experiment.json").read_text())[key] is False
    assert getattr(resume_settings(parse("--resume", "--name", "kept", "--storage", str(tmp_path)), "ranking"), key) is False
    # A run recorded without the flag cannot be resumed with it: the flag is named.
    args = parse("--gpus", "0", "--name", "default", "--storage", str(tmp_path))
    s = settings_from_args(args, "ranking")
    s.local_experiment_dir().mkdir(parents=True)
    write_experiment_info(s, args)
    with pytest.raises(LaunchError, match=flag):
        resume_settings(parse("--resume", "--name", "default", "--storage", str(tmp_path), flag), "ranking")


def test_split_helpers_compute_what_statistics_computes():
    assert split_seeds(0, 3) == [1, 2, 3]
    values = [0.8, 0.75, 0.9, 0.85, float("nan")]
    s = summarise_values(values)
    finite = values[:4]
    assert s == {"median": statistics.median(finite), "mean": statistics.fmean(finite),
                 "std": statistics.stdev(finite), "n": 4}
    assert summarise_values([]) == {"n": 0}


def test_other_split_seeds_draw_other_splits_of_the_same_photos_and_the_probe_is_fitted_on_each():
    from iqa_ray.evaluation.baselines import ridge_probe
    from iqa_ray.training.loaders import load_run_table

    config = TrainConfig.from_dict({"dataset": f"livec:{LIVEC}", "split_fractions": [0.6, 0.2, 0.2]})
    table = load_run_table(config)
    counts = table["split"].value_counts().to_dict()
    assert counts == {"train": 376, "val": 126, "test": 125}
    columns = split_columns(config, table, [1, 2])
    tests = [set(table["image_id"][np.asarray(columns[k]) == "test"]) for k in (1, 2)]
    assert tests[0] != tests[1] and len(tests[0]) == len(tests[1]) == 125
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(table), 8)) + table["mos"].to_numpy()[:, None] / 50
    probes = probe_on_splits(features, table, columns)
    split = np.asarray(columns[2])
    direct = ridge_probe(features, table["mos"].to_numpy(dtype=float),
                         *(np.flatnonzero(split == s) for s in ("train", "val", "test")))
    assert probes[2]["srcc"] == direct["srcc"]


@pytest.fixture
def small_livec(tmp_path):
    """60 LIVE Challenge photos in the livec layout (a copy of the shared subset's first rows)."""
    root = tmp_path / "livec-small"
    (root / "Images").mkdir(parents=True)
    table = pd.read_csv(LIVEC / "livec.csv").head(60)
    for name in table["image"]:
        shutil.copy(LIVEC / "Images" / name, root / "Images" / name)
    table.to_csv(root / "livec.csv", index=False)
    return root


def add_flat_photos(root, n):
    """``n`` flat grey 500x500 JPEGs added to a LIVE Challenge copy (BRISQUE gives them no finite score)."""
    from PIL import Image

    names = [f"flat{i}.jpg" for i in range(n)]
    for name in names:
        Image.new("RGB", (500, 500), (128, 128, 128)).save(root / "Images" / name)
    table = pd.read_csv(root / "livec.csv")
    flat = pd.DataFrame({"image": names, "mos": np.linspace(20, 40, n)})
    pd.concat([table, flat]).to_csv(root / "livec.csv", index=False, na_rep="nan")
    return names


@pytest.mark.slow
def test_the_cpu_recipe_searches_scores_baselines_and_reports_splits_end_to_end(small_livec, spoil_livec, tmp_path,
                                                                             capsys, shared_ray):
    from iqa_ray.data.datasets.registry import load_iqa_dataset

    # The copy has three bad rows (a NaN MOS, a missing file, a truncated JPEG), which --skip-bad-rows
    # leaves out, and flat grey photos, which BRISQUE cannot score (issue 37).
    bad, flat = spoil_livec(small_livec), add_flat_photos(small_livec, 6)
    with pytest.warns(UserWarning, match="skipped 3"):
        split = load_iqa_dataset("livec", small_livec, fractions=(0.6, 0.2, 0.2), on_error="skip", check_images=True)
    flat_in_test = int(split["image_id"][split["split"] == "test"].isin(flat).sum())
    assert flat_in_test >= 1
    storage = tmp_path / "results"
    code = main(["--dataset", f"livec:{small_livec}", "--smoke-test", "--splits", "2", "--name", "e2e",
                 "--storage", str(storage), "--gpus", "0", "--skip-bad-rows"], study="ranking")
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    experiment = storage / "e2e"
    summary = json.loads((experiment / "summary.json").read_text())
    info = json.loads((experiment / "experiment.json").read_text())
    # Skipped, not lost: the console says so, and both records list each row with its reason.
    for record in (summary, info):
        assert [(row["image"], row["row"]) for row in record["skipped_rows"]] == list(zip(bad, (4, 5, 6)))
    assert "truncated" in info["skipped_rows"][2]["reason"] and info["overrides"]["skip_bad_rows"] is True
    assert out.count("3 bad rows skipped (--skip-bad-rows), in no split: row 4 (image 'bad_mos.jpg')") == 2
    # What trained is said, not the study file's HyperIQA.
    assert summary["trained"] == {**summary["trained"], "family": "mlp", "backbone": "efficientnet_lite0",
                                  "backbone_training": "frozen", "feature_cache": True, "recipe": "cpu"}
    assert ("trained: mlp on efficientnet_lite0 (offline weights, frozen, features computed once), loss ranking; "
            "recipe cpu") in out and "HyperIQA" not in out
    # BRISQUE scores the test photos it can; the flat ones are counted, and no nan is printed.
    brisque = summary["baselines"]["brisque"]
    assert brisque["unscored"]["count"] == flat_in_test and brisque["scored"] == brisque["n"] - flat_in_test
    assert f"gave BRISQUE no finite score: {flat_in_test} x flat image" in out
    assert "nan" not in "".join(line for line in out.splitlines() if "SRCC" in line).lower()
    assert info["recipe"]["name"] == "cpu" and info["splits"] == 1  # a smoke test re-trains on one split
    assert summary["best_config"]["feature_cache"] is True
    assert set(summary["baselines"]) == {"linear_probe", "piqe", "brisque"}
    report = summary["splits"]
    assert report["seeds"] == [1] and report["per_split"][0]["error"] is None
    assert np.isfinite(report["test_srcc"]["median"]) and "probe_srcc" in report["per_split"][0]
    # the cpu recipe keeps the last epoch: each split's model is a refit on its training and validation
    # photos (their SRCC is not reported as validation), and the probe beside it is refitted too
    assert report["train_on_val"] is True and report["per_split"][0]["val_srcc"] is None
    assert "on training and validation photos" in out
    trials = pd.read_parquet(experiment / "trials.parquet")
    split_rows = trials[trials["kind"] == "split"]
    assert len(split_rows) == 1 and not split_rows["selected"].any()
    assert split_rows["test_srcc"].iloc[0] == pytest.approx(report["per_split"][0]["test_srcc"])
    assert trials[trials["kind"] == "search"]["selected"].sum() == 1
    assert "[features]" in out and "over 1 more random splits" in out
    # Every phase of the run is timed, in the order it ran, and printed: the refit and the
    # splits are there because this run had them; the phases add up to at most the total.
    ran = ["startup", "decoding", "features", "search", "refit", "test", "baselines", "splits", "report"]
    assert set(summary["phases"]) == set(ran)  # (summary.json's keys are sorted)
    assert all(s >= 0 for s in summary["phases"].values()) and summary["phases"]["search"] > 0
    assert sum(summary["phases"].values()) <= summary["total_s"] + 0.5
    timing = next(line for line in out.splitlines() if line.startswith("time: "))
    assert [part.split()[0] for part in timing[len("time: "):].split(";")[0].split(", ")] == ran
    assert timing.endswith(f"total {summary['total_s']:.0f} s")
    # The model handed back is the selected config re-trained on the search split's training and
    # validation photos: its trial holds the test metrics, the probe beside it is refitted too, and
    # the experiment folder resolves to it (score / load_model / export-model / evaluate).
    from iqa_ray.evaluation.cross_dataset import resolve_source

    assert summary["model"].startswith("refit/") and summary["refit"]["trial"] == summary["model"]
    refit_rows = trials[trials["kind"] == "refit"]
    assert len(refit_rows) == 1 and refit_rows["test_srcc"].iloc[0] == pytest.approx(summary["test"]["srcc"])
    assert trials[trials["selected"]]["test_srcc"].isna().all()
    assert summary["baselines"]["linear_probe"]["refit"] is True and "model handed back" in out
    # The test photos were scored from the feature cache, the whole network checked against it on some.
    scoring = summary["test_scoring"]
    assert scoring["source"] == "feature cache" and 1 <= scoring["checked"] <= summary["test"]["n"]
    assert f"scored {summary['test']['n']} test photos from the feature cache" in out
    assert resolve_source(experiment).trial == summary["model"]
    # The run report's table of the split re-runs, with their median and mean +- std.
    from test_notebooks import run_notebook

    _, text = run_notebook("run_report", tmp_path, IQA_EXPERIMENT=str(experiment))
    median = report["test_srcc"]["median"]
    assert f"1 splits: test SRCC median {median:.4f}" in text
    _, text = run_notebook("ranking_study", tmp_path, IQA_EXPERIMENT=str(experiment))
    assert "config.split_seed" not in text  # the split re-runs are not ranked with the trials
    # the family comparison shows the handed-back refit's test figure beside the selected config
    _, text = run_notebook("family_comparison", tmp_path, IQA_EXPERIMENTS=str(experiment),
                           IQA_FIGURES=str(tmp_path / "family_figures"))
    searched = int((trials["kind"] == "search").sum())
    assert f"test SRCC {summary['test']['srcc']:.4f}" in text and f": {searched} trials, selected" in text


def test_a_study_file_of_your_own_runs_as_written_unless_a_recipe_is_named(tmp_path):
    own = tmp_path / "mine.toml"
    own.write_text((Path(__file__).resolve().parents[1] / "search_spaces" / "ranking.toml").read_text())
    assert resolve_recipe(None, 0, load_study(str(own)), "embedded") == (None, None)
    recipe, note = resolve_recipe("cpu", 0, load_study(str(own)), "embedded")
    assert recipe.name == "cpu" and note is None


def test_the_console_describes_what_the_cpu_recipe_trains_not_the_study_files_hyperiqa():
    """Issue 37: the ranking study under the cpu recipe trains an MLP head on frozen Lite0 features,
    and its header must say so instead of the file's "HyperIQA + pairwise ranking loss"."""
    text = "\n".join(settings_from_args(parse("--gpus", "0"), "ranking").describe())
    assert "study ranking, as recipe cpu changes it (family, frozen_backbone;" in text
    assert "trains     mlp on efficientnet_lite0 (offline weights, frozen, features computed once), loss ranking" in text
    assert "HyperIQA" not in text and "hyperiqa" not in text
    # the study as written keeps its own description, and says what it trains
    plain = "\n".join(settings_from_args(parse("--recipe", "none"), "ranking").describe())
    assert "study ranking: HyperIQA + pairwise ranking loss" in plain
    assert "trains     hyperiqa on efficientnet_lite0 (offline weights, fine-tuned), loss ranking" in plain
    # a --set that changes the model is named as what changed it
    switched = "\n".join(settings_from_args(parse("--recipe", "none", "--set", "frozen_backbone=true"),
                                            "ranking").describe())
    assert "as --set changes it (frozen_backbone;" in switched and "HyperIQA" not in switched
    assert "hyperiqa on efficientnet_lite0 (offline weights, frozen), loss ranking" in switched


def test_the_model_record_says_searched_frozen_depth_weights_and_pretraining():
    from iqa_ray.search.study import describe_model, model_record

    efficiency = load_study("efficiency")
    assert describe_model(efficiency.trains()) == (
        "mlp on efficientnet_lite0 (offline weights, frozen depth searched over trainable_stages 0 | 1 | 2 | 5), "
        "loss ranking")
    record = model_record({"family": "mlp", "pretrained": "none", "trainable_stages": 2})
    assert record["backbone_training"] == "last 2 stages fine-tuned" and record["pretrained"] == "none"
    assert "(random weights, last 2 stages fine-tuned)" in describe_model(record)
    backbone = describe_model(load_study("backbone").trains())
    assert backbone.startswith("mlp on backbone searched over efficientnet_lite0 | efficientnet_b0 | resnet18")
    assert "pretraining searched over none | ssl" in describe_model(load_study("pretraining").trains())
    # a trial's resolved config names its SSL encoder file instead of `pretraining`
    resolved = model_record({"family": "mlp", "pretrained_encoder": "/enc/efficientnet_lite0.pt"})
    assert resolved["pretraining"] == "ssl" and "pre-trained further by self-supervision" in describe_model(resolved)


def test_the_summary_prints_and_records_the_model_that_trained(capsys):
    from types import SimpleNamespace

    from iqa_ray.search.study import model_record
    from iqa_ray.search.summary import print_summary, trained_record

    settings = settings_from_args(parse("--gpus", "0"), "ranking")
    resolved = settings.effective_study.resolve({**settings.effective_study.constants(), "alpha": 0.2,
                                                  "margin": 0.5, "lr": 1e-3})
    trained = json.loads(json.dumps(trained_record(settings, resolved)))  # as summary.json holds it
    assert trained == {**model_record(resolved), "recipe": "cpu"} and trained["family"] == "mlp"
    summary = {"study": "ranking", "trials": 2, "errored_trials": 0, "elapsed_s": 3.0, "searcher": "optuna",
               "trial_scheduler": "asha", "trained": trained, "best_config": {"alpha": 0.2}, "best_val": None,
               "test": None, "experiment": "/tmp/x", "exports": {}}
    print_summary(SimpleNamespace(study=settings.study), summary)
    out = capsys.readouterr().out
    assert ("trained: mlp on efficientnet_lite0 (offline weights, frozen, features computed once), loss ranking; "
            "recipe cpu") in out
    assert "HyperIQA" not in out

