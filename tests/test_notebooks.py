"""The analysis notebooks run top to bottom, headless, on the results of a real (small) search.

One session fixture runs two real searches through the launcher on the tiny pre-generated dataset: the
ranking study (4 trials x up to 3 epochs, ASHA with a grace period of 1, so some trials are stopped at a rung
and others run to the end) and a smoke run of the gmm study (so the cluster-distribution cell runs). Every
notebook is then executed with nbclient in a ``python3`` kernel of this interpreter (the kernel spec's
``python`` is replaced by ``sys.executable``, i.e. the venv's own ipykernel), the experiment passed through the
``IQA_EXPERIMENT`` / ``IQA_EXPERIMENTS`` environment variables, and the figures it saves are checked.

The notebooks never rank trials to pick one: they read the export's ``selected`` column (the rule of
``iqa_ray/core/selection.py``, the one the end-of-run summary uses), which the tests check by moving that mark to a
trial with a lower validation SRCC.

The executed copies are written next to each test's ``tmp_path`` for a look when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 5_000


# ----------------------------------------------------------------------------- helpers


def run_notebook(name: str, out_dir: Path, **env: str) -> tuple[object, str]:
    """Execute ``analysis/<name>.ipynb`` with ``env`` added; return the notebook and its text outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ANALYSIS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ANALYSIS)}})
    try:
        client.execute(env={**os.environ, **env})
    finally:
        nbformat.write(nb, out_dir / f"{name}.executed.ipynb")
    return nb, notebook_text(nb)


def notebook_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif output.get("output_type") in ("execute_result", "display_data"):
                data = output.get("data", {})
                parts.append(data.get("text/plain", ""))
                parts.append(data.get("text/html", ""))
    return "\n".join(parts)


def assert_png(path: Path) -> None:
    assert path.is_file(), f"figure not written: {path}"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG image"
    assert len(data) > MIN_PNG_BYTES, f"{path} is only {len(data)} bytes: an empty figure?"


TEST_COLUMNS = ("test_srcc", "test_plcc", "test_krcc", "test_rmse", "test_plcc_logistic", "test_n")


def best_trial(experiment: Path) -> str:
    """The trial the export marked ``selected``: the one the end-of-run summary reported."""
    trials = pd.read_parquet(experiment / "trials.parquet")
    selected = trials[trials["selected"].eq(True)]
    assert len(selected) == 1, f"{len(selected)} trials marked selected in {experiment}"
    trial_id = str(selected["trial_id"].iloc[0])
    assert json.loads((experiment / "summary.json").read_text())["best_trial_id"] == trial_id
    return trial_id


def move_selection(trials: pd.DataFrame, to: int) -> pd.DataFrame:
    """Mark row ``to`` selected instead, carrying the selected trial's test metrics (as the export would)."""
    was = trials.index[trials["selected"].eq(True)][0]
    test = [c for c in (*TEST_COLUMNS, "test_source") if c in trials.columns]
    values = trials.loc[was, test].to_list()
    trials.loc[was, test] = None
    trials.loc[to, test] = values
    trials["selected"] = trials.index == to
    return trials


def varying_config_keys(experiment: Path) -> list[str]:
    trials = pd.read_parquet(experiment / "trials.parquet")
    return [c.removeprefix("config.") for c in trials.columns
            if c.startswith("config.") and trials[c].nunique(dropna=True) > 1]


def copy_parquet_only(experiment: Path, target: Path) -> Path:
    """The two exported files alone, as when results are copied from another machine without checkpoints."""
    target.mkdir(parents=True)
    for name in ("trials.parquet", "epochs.parquet"):
        shutil.copy(experiment / name, target / name)
    trials = pd.read_parquet(target / "trials.parquet")
    trials["checkpoint_path"] = trials["checkpoint_path"].map(
        lambda p: None if p is None else "/elsewhere/" + "/".join(Path(p).parts[-3:]))
    trials.to_parquet(target / "trials.parquet", index=False)
    return target


# ----------------------------------------------------------------------------- the searches


# Session scope, not module: under `make test` the e2e worker may run another module's test between
# two of these (xdist's order), and a module fixture would then run both searches again (about 3 min).
@pytest.fixture(scope="session")
def experiments(tiny_dataset, tmp_path_factory, shared_ray_session) -> dict[str, Path]:
    from iqa_ray.cli.tune import main

    root = tmp_path_factory.mktemp("results")
    common = ["--storage", str(root), "--dataset", str(tiny_dataset.path), "--cpus-per-trial", "1",
              "--set", "crop_size=64", "--set", "eval_patches=1"]
    # The ranking study as written (HyperIQA), not the cpu recipe's frozen-feature MLP: the family
    # comparison needs two families (test_recipe.py runs the notebooks on a cpu-recipe search).
    assert main([*common, "--name", "ranking", "--num-samples", "4", "--max-epochs", "3", "--grace-period", "1",
                 "--recipe", "none"], study="ranking") == 0
    assert main([*common, "--name", "gmm", "--smoke-test"], study="gmm") == 0
    out = {"ranking": root / "ranking", "gmm": root / "gmm"}
    for path in out.values():
        assert (path / "trials.parquet").exists() and (path / "epochs.parquet").exists()
    return out


# ----------------------------------------------------------------------------- ranking_study


@pytest.mark.slow
def test_ranking_study_notebook(experiments, tmp_path):
    experiment = experiments["ranking"]
    _, text = run_notebook("ranking_study", tmp_path, IQA_EXPERIMENT=str(experiment))
    for name in ("ranking_alpha_margin_scatter", "ranking_learning_curves", "ranking_asha_stops"):
        assert_png(experiment / "figures" / f"{name}.png")
    best = best_trial(experiment)
    assert f"selected trial (chosen on validation by the search): {best}" in text
    # the notebook selects the trial the launcher reported at the end of the search
    assert json.loads((experiment / "summary.json").read_text())["best_trial"] == f"trial_{best}"
    trials = pd.read_parquet(experiment / "trials.parquet")
    # test metrics on the selected trial's row only (the tiny dataset has a test split)
    test = [c for c in TEST_COLUMNS if c in trials.columns]
    assert "test_n" in test and trials.loc[trials["selected"], "test_n"].notna().all()
    assert trials.loc[~trials["selected"], test].isna().all(axis=None)
    assert "test (held-out photos, best-by-validation weights): SRCC " in text
    for trial_id in trials["trial_id"]:  # every trial is in the stop-epoch table
        assert trial_id in text
    assert f"ASHA stopped {int(trials['stopped_by_scheduler'].sum())} of {len(trials)} trials" in text
    # TPE samples continuous values: no grid, no heatmap
    assert "no grid to pivot" in text
    assert not (experiment / "figures" / "ranking_alpha_margin_heatmap.png").exists()


@pytest.mark.slow
def test_grid_values_categorical_axes_and_a_copy_without_checkpoints(experiments, tmp_path):
    copy = copy_parquet_only(experiments["ranking"], tmp_path / "copied")
    trials = pd.read_parquet(copy / "trials.parquet")
    # Put the real trials on a 2 x 2 grid of alpha x margin, as the grid searcher would have.
    for column, (low, high) in (("config.alpha", (0.1, 0.5)), ("config.margin", (0.3, 1.0))):
        trials[column] = np.where(trials[column] > trials[column].median(), high, low)
    # and give them a categorical axis too (as the lr_schedule study searches lr_schedule)
    trials["config.lr_schedule"] = ["cosine", "step"] * (len(trials) // 2) + ["cosine"] * (len(trials) % 2)
    trials.to_parquet(copy / "trials.parquet", index=False)
    _, text = run_notebook("ranking_study", tmp_path, IQA_EXPERIMENT=str(copy))
    assert_png(copy / "figures" / "ranking_alpha_margin_heatmap.png")
    assert_png(copy / "figures" / "ranking_alpha_margin_scatter.png")
    assert "no grid to pivot" not in text

    _, text = run_notebook("hyperparameters", tmp_path, IQA_EXPERIMENT=str(copy))
    assert "edge check lr_schedule: ok: best lr_schedule = " in text and "(categorical" in text
    assert_png(copy / "figures" / "hparam_lr_schedule.png")
    # two grid values per axis: the best is at an edge by construction, and the notebook says so
    assert "edge check alpha: WARNING: " in text and "only 2 values tried" in text

    # the run report draws what the parquet files hold and explains why the model plots are skipped
    _, text = run_notebook("run_report", tmp_path, IQA_EXPERIMENT=str(copy))
    assert_png(copy / "figures" / "run_training_curves.png")
    assert "skipping the prediction scatter, feature PCA and cluster plots" in text
    assert "results copied without checkpoints?" in text
    assert not (copy / "figures" / "run_prediction_scatter.png").exists()


@pytest.mark.slow
def test_a_selected_trial_that_asha_stopped_counts_as_stopped_although_it_has_test_metrics(experiments, tmp_path):
    # After the search the selected trial's best-by-validation checkpoint is scored on the test split once,
    # however the trial ended; whether the selected trial was stopped depends on trial timing, so build
    # that case here. Its ended_by comes from the export, not from its test metrics.
    copy = copy_parquet_only(experiments["ranking"], tmp_path / "stopped-best")
    trials = pd.read_parquet(copy / "trials.parquet")
    best = trials.index[trials["selected"]][0]
    trials.loc[best, ["ended_by", "stopped_by_scheduler"]] = ["scheduler", True]
    trials.loc[best, ["test_srcc", "test_plcc"]] = [0.5, 0.5]
    trials.loc[best, "stop_epoch"] = 1
    assert trials.loc[trials.index != best, "test_srcc"].isna().all()  # no other trial has test metrics
    trials.to_parquet(copy / "trials.parquet", index=False)
    _, text = run_notebook("ranking_study", tmp_path, IQA_EXPERIMENT=str(copy))
    assert f"ASHA stopped {int(trials['stopped_by_scheduler'].sum())} of {len(trials)} trials" in text
    assert f"selected trial (chosen on validation by the search): {trials.at[best, 'trial_id']}" in text
    assert "(stopped by ASHA)" in text  # the selected trial's line says how it ended
    assert "test (held-out photos, best-by-validation weights): SRCC 0.5000, PLCC 0.5000" in text


@pytest.mark.slow
def test_the_notebooks_follow_the_selected_column_and_do_not_re_rank(experiments, tmp_path):
    # Mark a trial with a lower best_val_srcc than another as selected: every notebook must report that one.
    copy = copy_parquet_only(experiments["ranking"], tmp_path / "moved-selection")
    trials = pd.read_parquet(copy / "trials.parquet")
    others = trials[~trials["selected"] & trials["best_val_srcc"].notna()]
    to = others["best_val_srcc"].idxmin()
    if trials.at[to, "best_val_srcc"] >= trials["best_val_srcc"].max():  # all trials tied: break the tie
        trials.at[to, "best_val_srcc"] -= 0.1
    assert trials["best_val_srcc"].idxmax() != to
    trials = move_selection(trials, to)
    trials.to_parquet(copy / "trials.parquet", index=False)
    chosen = trials.at[to, "trial_id"]

    _, text = run_notebook("ranking_study", tmp_path, IQA_EXPERIMENT=str(copy))
    assert f"selected trial (chosen on validation by the search): {chosen}" in text
    _, text = run_notebook("hyperparameters", tmp_path, IQA_EXPERIMENT=str(copy))
    assert f"selected trial {chosen} (best_val_srcc " in text
    _, text = run_notebook("run_report", tmp_path, IQA_EXPERIMENT=str(copy))
    assert f"trial {chosen} (the selected trial, chosen on validation by the search)" in text
    _, text = run_notebook("family_comparison", tmp_path, IQA_EXPERIMENT=str(copy))
    assert f"({copy.name}/{chosen})" in text


@pytest.mark.slow
@pytest.mark.parametrize("column, message", [("best_val_srcc", "best_val_srcc"),
                                             ("selected", "re-export with iqa-ray export")])
def test_a_missing_column_fails_the_notebook_with_its_name(experiments, tmp_path, column, message):
    from nbclient.exceptions import CellExecutionError

    copy = copy_parquet_only(experiments["ranking"], tmp_path / "broken")
    pd.read_parquet(copy / "trials.parquet").drop(columns=[column]).to_parquet(copy / "trials.parquet")
    with pytest.raises(CellExecutionError, match=message):
        run_notebook("ranking_study", tmp_path, IQA_EXPERIMENT=str(copy))


# ----------------------------------------------------------------------------- hyperparameters


@pytest.mark.slow
@pytest.mark.parametrize("study", ["ranking", "gmm"])
def test_hyperparameters_notebook_checks_every_searched_axis(experiments, tmp_path, study):
    from iqa_ray.search.study_file import load_study

    experiment = experiments[study]
    axes = varying_config_keys(experiment)
    continuous = {p.name for p in load_study(study).params if p.type in ("uniform", "loguniform")}
    assert continuous and continuous <= set(axes), f"searched keys {continuous} should vary across trials: {axes}"
    _, text = run_notebook("hyperparameters", tmp_path, IQA_EXPERIMENT=str(experiment))
    for axis in axes:
        assert f"edge check {axis}: " in text, f"no edge check line for {axis}"
        assert_png(experiment / "figures" / f"hparam_{axis}.png")
    for line in text.splitlines():
        if line.startswith("edge check "):
            assert ": ok: " in line or ": WARNING: " in line


# ----------------------------------------------------------------------------- family_comparison


@pytest.mark.slow
def test_family_comparison_notebook_over_several_experiments_and_one(experiments, tmp_path):
    both = os.pathsep.join(str(experiments[k]) for k in ("ranking", "gmm"))
    figures = tmp_path / "figures"
    _, text = run_notebook("family_comparison", tmp_path, IQA_EXPERIMENTS=both, IQA_FIGURES=str(figures))
    assert_png(figures / "family_comparison.png")
    for group in ("hyperiqa / efficientnet_lite0", "gmm / efficientnet_lite0"):
        assert group in text
    for study in ("ranking", "gmm"):
        assert f"{study}/{best_trial(experiments[study])}" in text  # each family's selected trial
    assert "WARNING: the trials differ in epochs" in text  # 3-epoch ranking trials vs a 1-epoch smoke run

    experiment = experiments["gmm"]
    _, text = run_notebook("family_comparison", tmp_path, IQA_EXPERIMENT=str(experiment))
    assert_png(experiment / "figures" / "family_comparison.png")
    assert "gmm / efficientnet_lite0" in text and "hyperiqa" not in text


@pytest.mark.slow
def test_family_comparison_picks_among_experiments_by_selection_score_never_by_test(experiments, tmp_path):
    # Two experiments of the same group: the one whose selected trial has the better selection_score wins,
    # although the other's selected trial has the better test SRCC.
    low = copy_parquet_only(experiments["ranking"], tmp_path / "low-score-high-test")
    high = copy_parquet_only(experiments["ranking"], tmp_path / "high-score-low-test")
    for path, score, test_srcc in ((low, 0.2, 0.9), (high, 0.8, 0.1)):
        trials = pd.read_parquet(path / "trials.parquet")
        trials.loc[trials["selected"], ["selection_score", "test_srcc"]] = [score, test_srcc]
        trials.to_parquet(path / "trials.parquet", index=False)
    chosen = best_trial(experiments["ranking"])
    _, text = run_notebook("family_comparison", tmp_path, IQA_EXPERIMENTS=os.pathsep.join(map(str, (low, high))),
                           IQA_FIGURES=str(tmp_path / "figures"))
    assert f"({high.name}/{chosen}), test SRCC 0.1000" in text
    assert f"{low.name}/{chosen}" not in text


# ----------------------------------------------------------------------------- run_report


@pytest.mark.slow
@pytest.mark.parametrize("study", ["ranking", "gmm"])
def test_run_report_notebook_draws_the_selected_runs_plots(experiments, tmp_path, study):
    experiment = experiments[study]
    _, text = run_notebook("run_report", tmp_path, IQA_EXPERIMENT=str(experiment))
    best = best_trial(experiment)
    assert f"trial {best} (the selected trial, chosen on validation by the search)" in text
    figures = experiment / "figures"
    for name in ("run_training_curves", "run_prediction_scatter", "run_feature_pca", "run_sample_predictions"):
        assert_png(figures / f"{name}.png")
    # the test split rebuilt from the checkpoint's config is the one the trial was scored on
    trials = pd.read_parquet(experiment / "trials.parquet").set_index("trial_id")
    if pd.notna(trials.at[best, "test_srcc"]):
        assert "test_srcc" in text and ": agrees" in text
    if study == "gmm":
        assert_png(figures / "run_cluster_distribution.png")
        assert "mean posterior" in text  # the per-cluster table
    else:
        assert not (figures / "run_cluster_distribution.png").exists()
        assert "has no clusters" in text


# ----------------------------------------------------------------------------- iqa-ray report


@pytest.mark.slow
def test_iqa_ray_report_writes_every_notebook_as_html_with_its_figures(experiments, tmp_path, capsys):
    from iqa_ray.cli import main as iqa_ray_main

    experiment = tmp_path / "ranking"
    shutil.copytree(experiments["ranking"], experiment)
    assert iqa_ray_main(["report", str(experiment)]) == 0
    report = experiment / "report"
    names = ["family_comparison", "hyperparameters", "ranking_study", "run_report"]
    assert sorted(p.name for p in report.iterdir()) == sorted([f"{n}.html" for n in names] + ["index.html"])
    for name in names:
        page = (report / f"{name}.html").read_text()
        assert page.count("data:image/png;base64") >= 1, f"{name}.html has no figure"
        assert "Traceback" not in page
    index = (report / "index.html").read_text()
    assert all(f'href="{n}.html"' in index for n in names)
    assert "4 of 4 notebooks written" in capsys.readouterr().err
    # the ranking notebook applies to ranking studies only
    gmm = tmp_path / "gmm"
    shutil.copytree(experiments["gmm"], gmm)
    assert iqa_ray_main(["report", str(gmm), "--notebooks", "hyperparameters"]) == 0
    assert sorted(p.name for p in (gmm / "report").iterdir()) == ["hyperparameters.html", "index.html"]


# ----------------------------------------------------------------------------- the Optuna study


def wsgi_get(app, path: str) -> dict:
    import io
    import sys
    from wsgiref.util import setup_testing_defaults

    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD="GET", **{"wsgi.errors": sys.stderr, "wsgi.input": io.BytesIO()})
    status = {}
    body = b"".join(app(environ, lambda s, headers, exc=None: status.setdefault("s", s)))
    assert status["s"].startswith("200"), (path, status, body[:500])
    return json.loads(body)


@pytest.mark.slow
def test_the_optuna_study_holds_every_trial_and_opens_in_optuna_dashboard(experiments):
    import optuna

    experiment = experiments["ranking"]
    trials = pd.read_parquet(experiment / "trials.parquet")
    trials = trials[trials["kind"].eq("search")] if "kind" in trials else trials
    storage = f"sqlite:///{experiment / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    searched = sorted(study.trials[0].params)
    assert searched == ["alpha", "lr", "margin"]
    assert len(study.trials) == len(trials)
    for trial in study.trials:  # every trial: its parameters, and as value the last validation SRCC it reported
        assert trial.state == optuna.trial.TrialState.COMPLETE
        row = trials[np.isclose(trials["config.alpha"], trial.params["alpha"], rtol=0, atol=1e-12)]
        assert len(row) == 1, trial.params
        for key in searched:
            assert row[f"config.{key}"].iloc[0] == pytest.approx(trial.params[key], abs=1e-12)
        assert trial.value == pytest.approx(row["last_val_srcc"].iloc[0], abs=1e-9)

    import optuna_dashboard

    app = optuna_dashboard.wsgi(storage)
    (summary,) = wsgi_get(app, "/api/studies")["study_summaries"]
    assert summary["study_name"] == name and summary["directions"] == ["maximize"]
    shown = wsgi_get(app, f"/api/studies/{summary['study_id']}")["trials"]
    assert len(shown) == len(study.trials)
    assert {p["name"] for t in shown for p in t["params"]} == set(searched)


# ----------------------------------------------------------------------------- pareto_front


def test_pareto_front_notebook_draws_the_front_and_names_the_fastest_near_the_best(tmp_path):
    """A synthetic two-objective experiment (export as a search writes it): the notebook's figure,
    its front table and the "fastest within 0.02 SRCC" figure, checked against a hand count."""
    from iqa_ray.search.export import export_experiment

    experiment = tmp_path / "front"
    # (val SRCC at the kept epoch, ms per image, M parameters): a front of 4 and 2 dominated trials
    values = {"acc": (0.85, 40.0, 6.0), "near": (0.84, 12.0, 4.0), "mid": (0.80, 6.0, 3.0),
              "tiny": (0.70, 2.0, 1.0), "slow": (0.79, 50.0, 6.0), "worse": (0.69, 13.0, 4.0)}
    for trial_id, (srcc, ms, params) in values.items():
        folder = experiment / f"trial_{trial_id}"
        folder.mkdir(parents=True)
        (folder / "params.json").write_text(json.dumps({"lr": 1e-3, "hidden_dim": int(params * 64), "epochs": 2}))
        rows = [{"trial_id": trial_id, "epoch": e, "best_epoch": 2, "val_srcc": srcc - 0.05 * (2 - e), "val_plcc": srcc,
                 "latency_ms": ms, "params_m": params, "gflops": ms / 10, "latency_batch_ms": ms / 2} for e in (1, 2)]
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = {"study": {"objectives": [{"metric": "val_srcc", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}],
                       "select": "knee"},
             "params": {"lr": {"role": "nuisance", "type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    (experiment / "experiment.json").write_text(json.dumps({
        "study": "efficiency", "metric": "val_srcc", "mode": "max", "study_definition": study,
        "objectives": [["val_srcc", "max"], ["latency_ms", "min"]], "select": "knee"}))
    export_experiment(experiment)
    trials = pd.read_parquet(experiment / "trials.parquet").set_index("trial_id")
    assert trials.pareto_optimal.to_dict() == {"acc": True, "mid": True, "near": True, "slow": False, "tiny": True,
                                               "worse": False}
    from iqa_ray.cli.report import chosen_notebooks

    assert "pareto_front" in chosen_notebooks(experiment, None)
    _, text = run_notebook("pareto_front", tmp_path, IQA_EXPERIMENT=str(experiment))
    assert_png(experiment / "figures" / "pareto_front.png")
    assert "6 trials with values, 4 on the front" in text
    # within 0.02 of 0.85: acc (40 ms) and near (12 ms) -> near, 12 / 40 = 0.30x
    assert "fastest within 0.02 val_srcc: near (val val_srcc 0.8400, latency_ms 12): 0.30x" in text
    assert "selection rule: knee" in text
