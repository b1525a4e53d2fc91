"""``iqa-ray tune`` (= ``launch/tune_<study>.py``): a hyperparameter search on Ray Tune.

Flags -> :func:`~iqa_ray.search.settings.settings_from_args` (every check that needs no Ray) ->
:func:`~iqa_ray.search.run.run_search` (Ray, data, Tuner, summary).
"""

from __future__ import annotations

import argparse
import os
import sys

from iqa_ray.core.deprecations import SEARCH, old_flags
from iqa_ray.core.errors import DatasetError, LaunchError
from iqa_ray.core.options import ConfigError
from iqa_ray.core.paths import default_results_dir
from iqa_ray.search.cluster import check_address
from iqa_ray.search.mlflow_store import LOCAL
from iqa_ray.search.settings import DEFAULT_PROGRESS_EVERY_S, settings_from_args
from iqa_ray.search.study import SEARCHERS, TRIAL_SCHEDULERS, StudyError
from iqa_ray.search.study_file import available_studies


def build_parser(study: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or (f"launch/tune_{study}.py" if study else "launch/tune.py")
    p = argparse.ArgumentParser(prog=prog, description=(
        f"Run the {study or '<study>'} hyperparameter search on Ray Tune. With no flags on a machine without "
        "a GPU it runs a real search on CPU with the cpu recipe, on the study's own dataset (the ranking study: the "
        "627 LIVE Challenge photos that ship in datasets/livec)."))
    if study is None:
        p.add_argument("--study", required=True, help=f"study name or .toml path; available: {available_studies()}")
    p.add_argument("--gpus", type=float, default=None,
                   help="GPUs to use (0 = CPU only; default: every GPU of the cluster)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPU share per trial, e.g. 0.25 = four trials per GPU (default: 0.25 when GPUs are used); "
                        "a whole number above 1 (2, 4, ...) trains each trial data-parallel on that many GPUs")
    p.add_argument("--workers-per-trial", type=float, default=None, metavar="N",
                   help="train each trial data-parallel on N CPU workers (gloo; Ray Train), sharing "
                        "--cpus-per-trial (at least 1 CPU each); for GPUs use --gpus-per-trial N")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPU cores (torch threads) per trial (default: 1)")
    p.add_argument("--num-samples", type=int, default=None, help="trials to sample (grid: repeats of the grid)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (default: as resources allow)")
    p.add_argument("--searcher", choices=SEARCHERS, default=None, help="optuna (TPE), random or grid (default: the study's)")
    p.add_argument("--trial-scheduler", *old_flags(SEARCH, "trial_scheduler"), dest="trial_scheduler",
                   choices=TRIAL_SCHEDULERS, default=None,
                   help="what stops trials early: asha, hyperband or none (default: the study's trial_scheduler; "
                        "--scheduler is the old name)")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs a trial may train at most (default: the study's)")
    p.add_argument("--grace-period", type=int, default=None, help="epochs before ASHA may stop a trial")
    p.add_argument("--reduction-factor", type=int, default=None, help="ASHA/HyperBand reduction factor")
    p.add_argument("--seed", type=int, default=None, help="searcher seed (default: the study's)")
    p.add_argument("--time-budget", type=_minutes, default=None, metavar="MINUTES",
                   help="end the search after this many minutes: running trials stop with their last checkpoint "
                        "and are selected from like the others (default: no limit; --num-samples still applies)")
    p.add_argument("--select", default=None, metavar="RULE",
                   help="which trial the search hands back (validation only): best (the primary objective's best), "
                        "knee (the knee of a multi-objective study's Pareto front) or a cost budget such as "
                        "'latency_ms<=20' or 'latency_ms<=20,params_m<=5' (default: the study's select, else best)")
    p.add_argument("--dataset", default=None,
                   help="livec (the bundled LIVE Challenge photos; the ranking study's default), embedded (the synthetic "
                        "dataset; the other studies' and --smoke-test's default), a pre-generated folder, or "
                        "ADAPTER:ROOT (e.g. koniq10k:/data/koniq10k)")
    p.add_argument("--recipe", default=None, metavar="NAME|PATH",
                   help="what the protocol fixes (recipes/*.toml): cpu (frozen features computed once, a head searched "
                        "on them), paper (HyperIQA's published protocol), none (the study as written), or a file; "
                        "default: cpu where no GPU is found, else paper")
    p.add_argument("--splits", type=int, default=None, metavar="N",
                   help="after the search, re-train the selected config on N more random splits (one trial each, in "
                        "parallel) and report median and mean +- std over them (default: the recipe's)")
    p.add_argument("--splits-train-only", action="store_true",
                   help="train the --splits models on each split's training photos only; by default they train on "
                        "its training and validation photos where the selected config chooses nothing on validation "
                        "(select_epoch = last, as the cpu recipe), the probe beside them likewise")
    p.add_argument("--no-refit", action="store_true",
                   help="hand back the selected trial's own weights (trained on training photos); by default, where the "
                        "selected config chooses nothing on validation (select_epoch = last, as the cpu recipe), one more "
                        "trial re-trains it on training and validation photos and that model is handed back and tested")
    p.add_argument("--ensemble", type=int, default=None, metavar="K",
                   help="hand back a weighted ensemble of the search's trials: K rounds of greedy ensemble selection "
                        "with replacement over their validation predictions (Caruana et al. 2004), started from the "
                        "selected trial; each member re-trained like the refit, their scores averaged by load_model, "
                        "score and export-model (default 0: one trial, as today)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="leave a real dataset's bad rows out of every split instead of stopping: scores that are "
                        "missing or not valid, missing files, images that cannot be read (by default the search "
                        "stops before Ray starts, naming them all); the console, summary.json and experiment.json "
                        "list each one. Sets the config key skip_bad_rows, so --splits, the notebooks and evaluation "
                        "leave the same rows out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key for every trial (repeatable), e.g. --set crop_size=96")
    _add_run_flags(p)
    return p


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Where the search runs, where its results go, and what it prints and tracks."""
    p.add_argument("--address", default=None, help="address of an existing Ray cluster, e.g. 10.0.0.5:6379 or auto")
    p.add_argument("--storage", default=None,
                   help=f"results root: a local path or a pyarrow URI such as s3://bucket/iqa (default: {default_results_dir()})")
    p.add_argument("--name", default=None, help="experiment name (default: <study>-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment --name under --storage with its recorded study, dataset and --set "
                        "(resource flags such as --max-concurrent may change)")
    p.add_argument("--smoke-test", action="store_true", help="a tiny search (2 trials, 1 epoch, a sample of the data)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial from its checkpoint (default: 2)")
    p.add_argument("--progress-every", type=_seconds, default=DEFAULT_PROGRESS_EVERY_S, metavar="SECONDS",
                   help="seconds between live trial tables (default: %(default)g)")
    p.add_argument("--mlflow", nargs="?", const=LOCAL, default=None, metavar="URI",
                   help="track every trial (parameters, per-epoch metrics, status) and the summary in MLflow: alone, "
                        "in an SQLite store in the experiment folder (<storage>/<name>/mlflow.db); with a URI, there "
                        "(http(s)://HOST[:PORT], sqlite:////abs/path.db); needs pip install \"iqa-ray[mlflow]\"")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own console instead of ours: its trial tables and every worker's log lines "
                        "(by default those stay in Ray's log files and <experiment>/driver.log)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, e.g. 30, got {text!r}")
    return value


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of minutes > 0, e.g. 30, got {text!r}")
    return value


DEFAULT_STUDY = "ranking"


def main(argv: list[str] | None = None, prog: str | None = None, study: str | None = None,
         require_study: bool = False) -> int:
    """Run a search. ``study`` fixes the study (``launch/tune_<study>.py``); without it, ``--study``
    names one, and where ``--study`` is not given the default study runs unless ``require_study``
    (``launch/tune.py``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if study is None and not require_study and not any(a == "--study" or a.startswith("--study=") for a in argv):
        study = DEFAULT_STUDY
    args = build_parser(study, prog).parse_args(argv)
    study_name = study or args.study
    try:
        settings = settings_from_args(args, study_name)
        if args.address:
            check_address(args.address)
    except (StudyError, ConfigError, LaunchError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Tune snapshots the experiment state whenever a trial has checkpointed num_to_keep times; with
    # a checkpoint every epoch that is often and wanted (it is what --resume restores from).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Snapshot the experiment state at least every 2 s (Tune's automatic period is >= 10 s): it
    # bounds how much a killed driver's --resume has to redo.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    from iqa_ray.search.run import run_search

    try:
        return run_search(settings, args)
    except (LaunchError, StudyError, ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
