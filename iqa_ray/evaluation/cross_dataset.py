"""Cross-dataset evaluation of a trained model: the table IQA papers report.

    iqa-ray evaluate EXPERIMENT_OR_RUN --dataset SPEC [--dataset SPEC ...] [--out DIR] [--device cpu|cuda]

``EXPERIMENT_OR_RUN`` is one of

* an experiment folder of a search (``RESULTS_DIR/<name>``): its ``summary.json`` names the model
  the search handed back (``model``: the selected configuration re-trained on training and
  validation photos, ``refit/<trial folder>``, or the selected trial's folder; summaries written
  before refits name only ``best_trial``), whose newest ``checkpoint_*`` folder holds its kept weights;
* a run folder holding a checkpoint (``checkpoint.pt``: an ``iqa-train`` run, or one Tune
  ``checkpoint_*`` folder);
* a checkpoint file.

The first row of the table is the model's own test split: the dataset recorded in the
checkpoint's config (``config.data.dataset``), decoded with the run's label, ``split_seed`` and
image size, and only its ``split == "test"`` rows scored. Every other ``--dataset`` is scored whole
(all its rows: the model never saw it). A ``--dataset`` that is the model's own dataset is never
scored whole (the model trained on the rest of it): the first row covers it, and its note says so.
Crops, patches and image size are the recorded config's, applied by
:func:`iqa_ray.training.inference.evaluate_dataset`, so the scores follow the engine's evaluation protocol.

Writes ``cross_dataset.md`` and ``cross_dataset.csv`` (atomically) into ``--out`` (default: the
experiment or run folder, or the folder holding the checkpoint file) and prints the markdown. A bad
path, a dataset that does not load or an experiment without a selected trial exits with status 2,
an ``error:`` line on stderr and no file written. See docs/EVALUATE.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from iqa_ray.core.ensembles import ENSEMBLE_FILE, is_manifest
from iqa_ray.core.paths import REFIT_DIR

if TYPE_CHECKING:
    import pandas as pd
    import torch

OUTPUT_MD = "cross_dataset.md"
OUTPUT_CSV = "cross_dataset.csv"
SUMMARY_FILE = "summary.json"
# The metrics shown in the markdown table; the CSV holds every metric of iqa_ray.core.metrics.all_metrics.
SHOWN_METRICS = (("srcc", "SRCC"), ("plcc", "PLCC"), ("krcc", "KRCC"), ("rmse", "RMSE"))
# Evaluation settings of the recorded config printed above the table (those the config has).
EVAL_SETTINGS = ("crop_size", "eval_patches", "image_size", "short_side", "whole_image", "patch_placement",
                 "label", "split_seed")
ACCEPTED_FORMS = ("an experiment folder (holding summary.json), a trial folder of a search (holding params.json "
                  "and checkpoint_* folders), a run folder holding a checkpoint (checkpoint.pt), or a checkpoint file")
OWN_NOTE = "own dataset: its held-out test split (the model trained on its train split and was selected on val)"
OWN_REPEATED_NOTE = "; also given as --dataset: scored on its test split only, never whole"
CROSS_NOTE = "never seen in training: every image scored"


class EvaluateError(Exception):
    """A bad argument (path, experiment, dataset); printed as ``error: ...`` with exit status 2."""


@dataclass(frozen=True)
class Source:
    """Where the model comes from."""

    kind: str  # "experiment", "run", "trial", "checkpoint" or "ensemble"
    checkpoint: Path  # a checkpoint file or a folder holding one (what model_from_checkpoint takes); an ensemble's manifest
    folder: Path  # the default output folder
    trial: str | None = None  # the handed-back model's trial folder (experiments): refit/<trial> or the selected trial's


# ----------------------------------------------------------------------------- locating the model


def _looks_like_experiment(folder: Path) -> bool:
    return ((folder / "experiment.json").exists() or any(folder.glob("experiment_state-*.json"))
            or any(p.is_dir() and (p / "params.json").exists() for p in folder.iterdir()))


def latest_trial_checkpoint(trial_dir: Path) -> Path | None:
    """The newest ``checkpoint_*`` folder of a Tune trial that holds a checkpoint file."""
    from iqa_ray.training.checkpoints import CHECKPOINT_FILE

    found = sorted(p for p in trial_dir.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file())
    return found[-1] if found else None


def _experiment_source(folder: Path) -> Source:
    summary_file = folder / SUMMARY_FILE
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluateError(f"cannot read {summary_file}: {exc}") from None
    # The model the search handed back (a refit of the selected configuration, refit/<trial>), or,
    # in summaries without it, the selected trial.
    key = "model" if isinstance(summary, dict) and summary.get("model") else "best_trial"
    trial = summary.get(key) if isinstance(summary, dict) else None
    if not trial:
        raise EvaluateError(f"experiment {folder} has no selected trial ({SUMMARY_FILE} names no best_trial)")
    trial = str(trial)
    if key == "model" and trial == ENSEMBLE_FILE:  # --ensemble K: the members averaged (iqa_ray.evaluation.ensemble)
        if not (folder / trial).is_file():
            raise EvaluateError(f"experiment {folder}: the ensemble it handed back, {folder / trial}, does not exist")
        return Source("ensemble", folder / trial, folder, trial)
    parts = Path(trial).parts
    allowed = 2 if key == "model" and parts[:1] == (REFIT_DIR,) else 1  # refit/<trial folder>
    if len(parts) != allowed or Path(trial).is_absolute() or any(p in (".", "..") for p in parts):
        raise EvaluateError(f"{summary_file}: {key} {trial!r} is not a trial folder name"
                            + (f" (or {REFIT_DIR}/<trial folder>)" if key == "model" else ""))
    trial_dir = folder / trial
    if not trial_dir.is_dir():
        raise EvaluateError(f"experiment {folder}: the folder of the model it handed back, {trial_dir}, does not exist")
    checkpoint = latest_trial_checkpoint(trial_dir)
    if checkpoint is None:
        raise EvaluateError(f"experiment {folder}: the model it handed back, {trial}, left no checkpoint "
                            f"(no checkpoint_*/checkpoint.pt in {trial_dir})")
    return Source("experiment", checkpoint, folder, trial)


def resolve_source(path: str | os.PathLike[str]) -> Source:
    """What ``EXPERIMENT_OR_RUN`` names.

    Raises:
        EvaluateError: nothing there, an experiment with no summary or no selected trial, or a
            folder that is none of the accepted forms (the message lists them).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise EvaluateError(f"no such file or folder: {p}; accepted: {ACCEPTED_FORMS}")
    from iqa_ray.training.checkpoints import CHECKPOINT_FILE  # imports torch: after the cheap check
    if is_manifest(p):
        return Source("ensemble", p, p.parent, p.name)
    if p.is_file():
        return Source("checkpoint", p, p.parent)
    if (p / SUMMARY_FILE).is_file():
        return _experiment_source(p)
    if (p / CHECKPOINT_FILE).is_file():
        return Source("run", p, p)
    if (p / "params.json").is_file():  # a Tune trial folder: its newest checkpoint
        checkpoint = latest_trial_checkpoint(p)
        if checkpoint is None:
            raise EvaluateError(f"trial {p} left no checkpoint (no checkpoint_*/{CHECKPOINT_FILE} in it)")
        return Source("trial", checkpoint, p, p.name)
    if _looks_like_experiment(p):
        raise EvaluateError(f"experiment {p} has no {SUMMARY_FILE} yet, so no selected trial: the search has not "
                            "finished (or ended with no usable trial); finish or resume it first")
    raise EvaluateError(f"{p} is neither an experiment folder nor a run folder (no {SUMMARY_FILE}, no "
                        f"{CHECKPOINT_FILE}); accepted: {ACCEPTED_FORMS}")


# ----------------------------------------------------------------------------- scoring


def _identity(table: Any, spec: str) -> tuple[str, ...]:
    """What a loaded table is, independently of how its spec was spelled (aliases, relative paths)."""
    attrs = table.attrs
    if not attrs.get("root"):
        return ("spec", spec)
    where = [os.path.realpath(os.path.expanduser(str(attrs[k]))) if attrs.get(k) else ""
             for k in ("root", "image_dir", "label_file")]  # a csv root can hold several label files
    return (str(attrs.get("dataset", "")), *where)


def _load(spec: str, config: Any, what: str) -> Any:
    from iqa_ray.data.catalog import load_table

    try:
        return load_table(spec, label=config.data.label, split_seed=config.data.split_seed)
    except (ValueError, OSError) as exc:  # DatasetError is a ValueError; an unknown adapter name is one too
        raise EvaluateError(f"{what} {spec!r} does not load: {exc}") from None


def cross_dataset_rows(model: Any, config: Any, specs: Sequence[str], device: Any,
                       progress: Any = None) -> list[dict[str, Any]]:
    """The table's rows: the model's own test split first, then every other dataset scored whole.

    Every dataset is loaded once first, so a spec that does not load fails before anything is
    scored. Scores come from :func:`iqa_ray.training.inference.evaluate_dataset` with the run's config.

    Raises:
        EvaluateError: a dataset (the model's own or one of ``specs``) does not load.
    """
    from iqa_ray.core.errors import DatasetError
    from iqa_ray.training import inference

    say = progress or (lambda message: None)
    own_spec = config.data.dataset
    own_table = _load(own_spec, config, "the model's own dataset (from its checkpoint's config)")
    own_id = _identity(own_table, own_spec)
    n_own_test = int((own_table["split"] == "test").sum())
    del own_table
    others: list[str] = []
    repeated_own = False
    seen = {own_id}
    for spec in specs:
        table = _load(spec, config, "--dataset")
        key = _identity(table, spec)
        del table
        if key == own_id:
            repeated_own = True
        elif key not in seen:
            seen.add(key)
            others.append(spec)

    def scored(spec: str, split: str) -> dict[str, Any]:
        say(f"scoring {spec} ({'test split' if split == 'test' else 'every image'})")
        try:
            return inference.evaluate_dataset(model, config, spec, split=split, device=device)
        except DatasetError as exc:  # e.g. an unreadable image found while decoding
            raise EvaluateError(f"dataset {spec!r} could not be scored: {exc}") from None

    from iqa_ray.core.metrics import METRIC_NAMES

    note = OWN_NOTE + (OWN_REPEATED_NOTE if repeated_own else "")
    if n_own_test:
        own = scored(own_spec, "test")
    else:
        own = {**{k: math.nan for k in METRIC_NAMES}, "n": 0}
        note = "own dataset: it has no test split, nothing scored" + (OWN_REPEATED_NOTE if repeated_own else "")
    rows = [_row(own_spec, "test", own, "own", note)]
    for spec in others:
        rows.append(_row(spec, "all", scored(spec, "all"), "cross", CROSS_NOTE))
    return rows


def _row(spec: str, split: str, metrics: dict[str, Any], role: str, note: str) -> dict[str, Any]:
    values = {k: float(v) for k, v in metrics.items() if k != "n"}
    return {"dataset": spec, "split": split, "n": int(metrics["n"]), **values, "role": role, "note": note}


# ----------------------------------------------------------------------------- output


def _number(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.4f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[dict[str, Any]], header: list[str]) -> str:
    """The table as markdown, under a short header naming the model and its evaluation settings."""
    shown = [(k, name) for k, name in SHOWN_METRICS if any(k in r for r in rows)]
    lines = ["# Cross-dataset evaluation", "", *[f"- {h}" for h in header], ""]
    lines.append("| dataset | split scored | n images | " + " | ".join(n for _, n in shown) + " | note |")
    lines.append("|---|---|---:|" + "---:|" * len(shown) + "---|")
    for r in rows:
        split = "test" if r["split"] == "test" else "all (whole dataset)"
        lines.append(f"| {_cell(r['dataset'])} | {split} | {r['n']} | "
                     + " | ".join(_number(r.get(k)) for k, _ in shown) + f" | {_cell(r['note'])} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The table as CSV: ``dataset, split, n``, every metric at full precision, ``role, note``."""
    metrics = [k for k in rows[0] if k not in ("dataset", "split", "n", "role", "note")]
    columns = ["dataset", "split", "n", *metrics, "role", "note"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(r[k]) if isinstance(r.get(k), float) else r.get(k, "")) for k in columns})
    return buffer.getvalue()


def describe(source: Source, config: Any, device: Any) -> list[str]:
    """The header lines: where the model is from and the settings it is evaluated with."""
    from iqa_ray.training.checkpoints import CHECKPOINT_FILE

    m, d = config.model, config.data
    checkpoint = source.checkpoint / CHECKPOINT_FILE if source.checkpoint.is_dir() else source.checkpoint
    what = {"experiment": f"experiment {source.folder}, " + (f"the selected config refitted, {source.trial}"
                                                              if "/" in str(source.trial) else f"selected trial {source.trial}"),
            "run": f"run folder {source.folder}", "checkpoint": "checkpoint file"}[source.kind]
    settings = ", ".join(f"{k} {getattr(d, k)}" for k in EVAL_SETTINGS if hasattr(d, k))
    kept = "final weights (trained on training and validation photos)" if config.optim.train_on_val else "kept weights"
    return [f"model: {m.family} / {m.backbone}, {kept} of {checkpoint} ({what})",
            f"trained on: {d.dataset}",
            f"evaluation settings (the recorded config's): {settings}; device {device}"]


# ----------------------------------------------------------------------------- command line


def _device(name: str | None) -> Any:
    import torch

    from iqa_ray.core.runtime import default_device

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise EvaluateError(f"--device {name!r}: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise EvaluateError(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("--device cuda: no CUDA device is available here")
    return device


def run(args: argparse.Namespace) -> tuple[str, list[Path]]:
    """Score, write both files, return the markdown and the written paths."""
    source = resolve_source(args.source)  # first: a bad path fails before torch is imported
    from iqa_ray.core.io import CheckpointError, atomic_write_text
    from iqa_ray.core.options import ConfigError
    from iqa_ray.training.checkpoints import model_from_checkpoint

    if source.kind == "ensemble":
        raise EvaluateError(f"{source.checkpoint} is an ensemble (--ensemble): iqa-ray evaluate scores one model; "
                            "evaluate one of its members' trial folders (listed in it), or score photos with it by "
                            "iqa-ray score")
    device = _device(args.device)
    out = args.out if args.out is not None else source.folder
    if out.exists() and not out.is_dir():
        raise EvaluateError(f"--out {out} exists and is not a folder")
    try:
        model, config = model_from_checkpoint(source.checkpoint, device=device)
    except (CheckpointError, ConfigError) as exc:
        raise EvaluateError(f"cannot load the model from {source.checkpoint}: {exc}") from None
    rows = cross_dataset_rows(model, config, args.dataset, device,
                              progress=lambda message: print(f"[evaluate] {message}", file=sys.stderr, flush=True))
    markdown = to_markdown(rows, describe(source, config, device))
    table = to_csv(rows)
    paths = [out / OUTPUT_MD, out / OUTPUT_CSV]
    try:
        atomic_write_text(paths[0], markdown)
        atomic_write_text(paths[1], table)
    except OSError as exc:
        raise EvaluateError(f"cannot write the results into {out}: {exc}") from None
    return markdown, paths


def cross_dataset_table(
    model_config_runs: Mapping[str, Any],
    eval_sets: Mapping[str, str | tuple[str, str]],
    *,
    metrics: Sequence[str] = ("srcc", "plcc"),
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """Seed 004's table: every trained run scored on every evaluation set.

    Args:
        model_config_runs: row name -> a trained run: a checkpoint file or run/trial folder
            (rebuilt with :func:`iqa_ray.training.checkpoints.model_from_checkpoint`, best weights), a
            ``(model, TrainConfig)`` pair, or a :class:`iqa_ray.training.engine.FitResult`.
        eval_sets: column name -> a dataset spec (``embedded``, a pre-generated folder,
            ``koniq10k:/root``, ...) scored on all its images, or ``(spec, split)`` to score one
            split (``("embedded", "test")``).
        metrics: which metrics to tabulate (any key of :func:`iqa_ray.core.metrics.all_metrics`).
        device: where to score.

    Returns:
        A :class:`pandas.DataFrame`, one row per run and columns ``"<set> SRCC"``, ``"<set> PLCC"``,
        ...; ``attrs["n"]`` holds the number of images of each set.
    """
    import pandas as pd
    import torch

    from iqa_ray.core.runtime import default_device
    from iqa_ray.training.checkpoints import model_from_checkpoint
    from iqa_ray.training.inference import evaluate_dataset

    device = torch.device(device) if device is not None else default_device()
    rows: dict[str, dict[str, float]] = {}
    sizes: dict[str, int] = {}
    for run_name, run in model_config_runs.items():
        if isinstance(run, (str, os.PathLike)):
            model, config = model_from_checkpoint(run, device=device)
        elif hasattr(run, "model") and hasattr(run, "config"):
            model, config = run.model, run.config
        else:
            model, config = run
        row: dict[str, float] = {}
        for set_name, target in eval_sets.items():
            spec, split = (target, "all") if isinstance(target, str) else target
            scored = evaluate_dataset(model.to(device), config, spec, split=split, device=device)
            sizes[set_name] = scored["n"]
            for m in metrics:
                row[f"{set_name} {m.upper()}"] = scored[m]
        rows[run_name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "run"
    table.attrs["n"] = sizes
    return table

