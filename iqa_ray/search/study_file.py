"""Study files: a search written as data (one TOML file in ``search_spaces/``), read and validated up front.

A study names what is searched and how, following the tuning playbook's vocabulary: every
hyperparameter is *scientific* (what the study is about, e.g. the ranking loss's alpha and
margin), *nuisance* (must be tuned for a fair comparison, e.g. the learning rate) or *fixed*
(held constant, listed under ``[fixed]``). Example::

    [study]
    description = "HyperIQA with the pairwise ranking loss"
    metric = "val_srcc"
    mode = "max"
    num_samples = 12
    max_epochs = 6

    [fixed]
    family = "hyperiqa"
    loss = "ranking"

    [params.alpha]
    role = "scientific"
    type = "uniform"              # uniform | loguniform | int | logint | choice
    low = 0.0
    high = 0.7
    grid = [0.1, 0.2, 0.3, 0.5, 0.7]   # used by the grid searcher

    [params.lr]
    role = "nuisance"
    type = "loguniform"
    low = 1e-4
    high = 3e-3
    [params.lr.range_by.backbone]      # optional: the range depends on another parameter
    resnet18 = [1e-4, 1e-3]

Quality-aware pre-training (seed 004) is a searchable choice: the study-only key
``pretraining`` (``none`` or ``ssl``, fixed or a ``choice``) decides whether a trial's backbone
starts from a self-supervised encoder, and an optional ``[pretraining]`` table holds the
:class:`~iqa_ray.ssl.config.PretrainConfig` keys of that encoder (plus ``source`` and ``splits``: the
unlabelled images, by default the training dataset's ``train`` split, drawn with the trials'
``split_seed``, which, like every key that shapes the decoded dataset, is never searched)::

    [pretraining]
    epochs = 4
    crop_size = 96

    [params.pretraining]
    role = "scientific"
    type = "choice"
    values = ["none", "ssl"]

The launcher pre-trains one encoder per backbone the space can use before any trial starts
(:mod:`iqa_ray.search.encoders`) and hands their paths to
:meth:`~iqa_ray.search.study.Study.with_encoders`; :meth:`~iqa_ray.search.study.Study.resolve`
then turns ``pretraining = "ssl"`` into ``pretrained_encoder = <path>``. Search the encoder's
learning rate with ``backbone_lr``.

Everything is checked before any trial starts: keys must be config keys, ranges must be
ordered and inside what the config accepts (both ends are built into a real config), grids
must lie in their ranges, and the space may not be empty. A parameter with ``range_by`` is
searched as a unit value in [0, 1] (``<name>__unit``) that
:meth:`~iqa_ray.search.study.Study.resolve` maps, log-scaled when the type is ``loguniform``,
into the range of the chosen value: every searcher (grid, random, TPE) handles that without
conditional spaces.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Mapping

import tomllib

from iqa_ray.core.deprecations import CONFIG, SEARCH, renamed_keys
from iqa_ray.core.options import ConfigError
from iqa_ray.search.study import PRETRAINING, SEARCHERS, TRIAL_SCHEDULERS, Param, Study, StudyError
from iqa_ray.training.config import TrainConfig, valid_keys

ROLES = ("scientific", "nuisance")
# Data keys the launcher decodes the dataset with, once for all trials (search/run.py).
DECODE_KEYS = ("dataset", "label", "split_seed", "image_size")
TYPES = ("uniform", "loguniform", "int", "logint", "choice")
STUDY_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
_STUDY_KEYS = {"name", "description", "metric", "mode", "num_samples", "max_epochs", "grace_period",
               "reduction_factor", "searcher", "trial_scheduler", "seed", "objectives", "select", "sampler"}
#: Optuna samplers a study may name (`sampler`): TPE (also multi-objective) and NSGA-II.
SAMPLERS = ("tpe", "nsga2")
_PARAM_KEYS = {"role", "type", "low", "high", "values", "grid", "range_by", "description"}
PRETRAINING_CHOICES = ("none", "ssl")


def available_studies(directory: Path = STUDY_DIR) -> list[str]:
    """Names of the studies in ``search_spaces/`` (one ``.toml`` file each)."""
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_study(name_or_path: str | Path, directory: Path = STUDY_DIR) -> Study:
    """Load and validate a study by name (``ranking``) or path (``my/study.toml``).

    Raises:
        StudyError: the file is missing or invalid; the message says what is valid.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = directory / f"{name_or_path}.toml"
    if not path.exists():
        raise StudyError(f"no study {str(name_or_path)!r} (looked for {path}); available: {available_studies(directory)}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML: {exc}") from exc
    return parse_study(data, name=path.stem, path=path)


def parse_study(data: Mapping[str, Any], *, name: str, path: Path | None = None) -> Study:
    """Validate the contents of a study file (see the module docstring for the format)."""
    where = str(path) if path else name
    unknown_tables = sorted(set(data) - {"study", "fixed", "params", "pretraining"})
    if unknown_tables:
        raise StudyError(f"{where}: unknown tables {unknown_tables}; valid: [study], [fixed], [params.<name>], "
                         "[pretraining]")
    # Renamed keys ([study] scheduler -> trial_scheduler, a run's scheduler -> lr_schedule) are still
    # read, with a deprecation message (iqa_ray.core.deprecations).
    meta = renamed_keys(dict(data.get("study", {})), SEARCH, where, error=StudyError)
    unknown = sorted(set(meta) - _STUDY_KEYS)
    if unknown:
        raise StudyError(f"{where}: unknown [study] keys {unknown}; valid: {sorted(_STUDY_KEYS)}")
    fixed = renamed_keys(dict(data.get("fixed", {})), CONFIG, f"{where}: [fixed]", error=StudyError)
    raw_params = renamed_keys(dict(data.get("params", {})), CONFIG, f"{where}: [params]", error=StudyError)
    keys = set(valid_keys()) | {PRETRAINING}
    bad_fixed = sorted(k for k in fixed if k not in keys)
    if bad_fixed:
        raise StudyError(f"{where}: [fixed] keys {bad_fixed} are not config keys; valid: {sorted(keys)}")
    if "epochs" in fixed:
        raise StudyError(f"{where}: set the epoch budget with [study] max_epochs, not [fixed] epochs")
    if not raw_params:
        raise StudyError(f"{where}: the search space is empty: add at least one [params.<name>] table")
    params = tuple(_parse_param(where, pname, spec, keys, fixed) for pname, spec in raw_params.items())
    objectives = _parse_objectives(where, meta)
    metric, mode = objectives[0] if objectives else (str(meta.get("metric", "val_srcc")), str(meta.get("mode", "max")))
    study = Study(
        name=str(meta.get("name", name)), path=path, description=str(meta.get("description", "")),
        fixed=fixed, params=params, metric=metric, mode=mode, objectives=objectives,
        select=str(meta.get("select", "best")), sampler=str(meta.get("sampler", "tpe")),
        num_samples=int(meta.get("num_samples", 12)), max_epochs=int(meta.get("max_epochs", 6)),
        grace_period=int(meta.get("grace_period", 1)), reduction_factor=int(meta.get("reduction_factor", 3)),
        searcher=str(meta.get("searcher", "optuna")), trial_scheduler=str(meta.get("trial_scheduler", "asha")),
        seed=int(meta.get("seed", 0)), roles={p.name: p.role for p in params} | {k: "fixed" for k in fixed},
        definition={k: dict(v) for k, v in data.items()},
        pretraining=dict(data.get("pretraining", {})),
    )
    check_study(where, study)
    return study


def _parse_objectives(where: str, meta: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """``[study] objectives`` as (metric, mode) pairs, or ``()`` when the study has one metric."""
    if "objectives" not in meta:
        return ()
    raw = meta["objectives"]
    example = '[{metric = "val_srcc", mode = "max"}, {metric = "latency_ms", mode = "min"}]'
    if not (isinstance(raw, list) and raw and all(isinstance(o, Mapping) and set(o) == {"metric", "mode"} for o in raw)):
        raise StudyError(f"{where}: objectives must be a list of {{metric, mode}} tables, e.g. objectives = {example}; "
                         f"got {raw!r}")
    objectives = tuple((str(o["metric"]), str(o["mode"])) for o in raw)
    primary = {"metric": objectives[0][0], "mode": objectives[0][1]}
    for key in ("metric", "mode"):
        if key in meta and str(meta[key]) != primary[key]:
            raise StudyError(f"{where}: {key} = {meta[key]!r} disagrees with the first (primary) objective "
                             f"{objectives[0]}; drop {key}, the primary objective sets it")
    return objectives


def _parse_param(where: str, name: str, spec: Mapping[str, Any], keys: set[str], fixed: Mapping[str, Any]) -> Param:
    at = f"{where}: [params.{name}]"
    if name not in keys:
        raise StudyError(f"{at}: {name!r} is not a config key; valid: {sorted(keys)}")
    if name in fixed:
        raise StudyError(f"{at}: {name!r} is both fixed and searched")
    if name == PRETRAINING and spec.get("type") != "choice":
        raise StudyError(f"{at}: pretraining is searched as type = \"choice\" with values among {list(PRETRAINING_CHOICES)}")
    unknown = sorted(set(spec) - _PARAM_KEYS)
    if unknown:
        raise StudyError(f"{at}: unknown keys {unknown}; valid: {sorted(_PARAM_KEYS)}")
    role = spec.get("role")
    if role not in ROLES:
        raise StudyError(f"{at}: role must be one of {ROLES} (fixed values go in [fixed]), got {role!r}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise StudyError(f"{at}: type must be one of {TYPES}, got {kind!r}")
    grid = tuple(spec.get("grid", ()))
    range_by = None
    if kind == "choice":
        values = tuple(spec.get("values", ()))
        if not values:
            raise StudyError(f"{at}: type 'choice' needs a non-empty `values = [...]`")
        bad = [g for g in grid if g not in values]
        if bad:
            raise StudyError(f"{at}: grid values {bad} are not among values {list(values)}")
        if name == PRETRAINING and not set(values) <= set(PRETRAINING_CHOICES):
            raise StudyError(f"{at}: values must be among {list(PRETRAINING_CHOICES)}, got {list(values)}")
        return Param(name, role, kind, values=values, grid=grid, description=str(spec.get("description", "")))
    low, high = spec.get("low"), spec.get("high")
    if "range_by" in spec:
        by_table = spec["range_by"]
        if not isinstance(by_table, Mapping) or len(by_table) != 1:
            raise StudyError(f"{at}: range_by must be one table, e.g. [params.{name}.range_by.backbone]")
        (by, ranges), = by_table.items()
        parsed = {}
        for choice, bounds in ranges.items():
            if not (isinstance(bounds, list) and len(bounds) == 2):
                raise StudyError(f"{at}: range_by.{by}.{choice} must be [low, high], got {bounds!r}")
            parsed[choice] = _check_range(at + f" range_by.{by}.{choice}", kind, *bounds)
        range_by = (by, parsed)
        low = min(b[0] for b in parsed.values())
        high = max(b[1] for b in parsed.values())
    else:
        low, high = _check_range(at, kind, low, high)
    out_of_range = [g for g in grid if not (isinstance(g, (int, float)) and low <= g <= high)]
    if out_of_range:
        raise StudyError(f"{at}: grid values {out_of_range} lie outside [{low}, {high}]")
    return Param(name, role, kind, low=low, high=high, grid=grid, range_by=range_by,
                 description=str(spec.get("description", "")))


def _check_range(at: str, kind: str, low: Any, high: Any) -> tuple[float, float]:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if not numeric:
        raise StudyError(f"{at}: type {kind!r} needs numeric `low` and `high`, got low={low!r}, high={high!r}")
    if not low < high:
        raise StudyError(f"{at}: low ({low}) must be < high ({high})")
    if kind in ("loguniform", "logint") and low <= 0:
        raise StudyError(f"{at}: a log scale needs low > 0, got {low}")
    if kind in ("int", "logint") and not (float(low).is_integer() and float(high).is_integer()):
        raise StudyError(f"{at}: integer parameters need integer bounds, got [{low}, {high}]")
    return (int(low), int(high)) if kind in ("int", "logint") else (float(low), float(high))


def budget_problem(num_samples: int, max_epochs: int, grace_period: int, reduction_factor: int) -> str | None:
    """What is wrong with a search's budget (a study's, or the settings a launch resolved), or ``None``."""
    for key, value, lo in (("num_samples", num_samples, 1), ("max_epochs", max_epochs, 1),
                           ("grace_period", grace_period, 1), ("reduction_factor", reduction_factor, 2)):
        if value < lo:
            return f"{key} must be >= {lo}, got {value}"
    if grace_period > max_epochs:
        return f"grace_period ({grace_period}) exceeds max_epochs ({max_epochs})"
    return None


def check_study(where: str, study: Study) -> None:
    try:  # before Ray starts: a metric no trial reports would make every trial look equally bad
        study.selection_rule  # checks the objectives (the primary one is metric, mode) and the rule  # noqa: B018
    except ValueError as exc:
        raise StudyError(f"{where}: {exc}") from None
    if study.sampler not in SAMPLERS:
        raise StudyError(f"{where}: sampler must be one of {SAMPLERS}, got {study.sampler!r}")
    if study.searcher not in SEARCHERS:
        raise StudyError(f"{where}: searcher must be one of {SEARCHERS}, got {study.searcher!r}")
    if study.trial_scheduler not in TRIAL_SCHEDULERS:
        raise StudyError(f"{where}: trial_scheduler must be one of {TRIAL_SCHEDULERS}, got {study.trial_scheduler!r}")
    problem = budget_problem(study.num_samples, study.max_epochs, study.grace_period, study.reduction_factor)
    if problem:
        raise StudyError(f"{where}: {problem}")
    decoded_once = sorted(p.name for p in study.params if p.name in DECODE_KEYS)
    if decoded_once:
        # The launcher decodes the dataset once, from the study's fixed values, and every trial reads
        # that copy: a searched value here would be recorded in each trial's config but never used.
        raise StudyError(f"{where}: {', '.join(decoded_once)} cannot be searched: the dataset is decoded once for "
                         f"every trial with the fixed {', '.join(DECODE_KEYS)}, so a searched value would be silently "
                         "ignored. Fix it in [fixed] or with --set KEY=VALUE (one search per value)")
    _check_pretraining(where, study)
    by_name = {q.name: q for q in study.params}
    for p in study.params:
        if not p.range_by:
            continue
        by, ranges = p.range_by
        if by in study.fixed:
            choices = [study.fixed[by]]
        elif by in by_name and by_name[by].type == "choice":
            choices = list(by_name[by].values)
        else:
            raise StudyError(f"{where}: {p.name} has range_by {by!r}, which must be a fixed value or a searched choice")
        missing = [c for c in choices if c not in ranges]
        if missing:
            raise StudyError(f"{where}: {p.name}.range_by.{by} has no range for {missing}")
    # Build real configs at the corners of the space: every value the searcher can propose must
    # be a valid run config, so no trial can fail hours in on a value caught here in a second.
    corners = [_corner_values(p) for p in study.params]
    for combo in itertools.islice(itertools.product(*corners), 512):
        values = {**study.fixed, "epochs": study.max_epochs}
        for p, v in zip(study.params, combo):
            values[p.name] = v
        values.pop(PRETRAINING, None)  # a study-only key: resolved to an encoder file at launch
        try:
            TrainConfig.from_dict(values)
        except ConfigError as exc:
            raise StudyError(f"{where}: the space contains an invalid config ({exc}); values: "
                             f"{ {p.name: v for p, v in zip(study.params, combo)} }") from exc


def _check_pretraining(where: str, study: Study) -> None:
    """``pretraining`` values and the ``[pretraining]`` table must make valid pre-training configs."""
    fixed = study.fixed.get(PRETRAINING)
    if fixed is not None and fixed not in PRETRAINING_CHOICES:
        raise StudyError(f"{where}: [fixed] pretraining must be one of {list(PRETRAINING_CHOICES)}, got {fixed!r}")
    table = study.pretraining
    if "backbone" in table:
        raise StudyError(f"{where}: [pretraining] takes no backbone: each trial's backbone is pre-trained "
                         "(set it in [fixed] or search it)")
    splits = table.get("splits", ["train"])
    if not (isinstance(splits, list) and splits and all(s in ("train", "val", "test") for s in splits)):
        raise StudyError(f"{where}: [pretraining] splits must be a non-empty list of train / val / test, got {splits!r}")
    if "test" in splits:
        raise StudyError(f"{where}: [pretraining] splits may not include 'test': pre-training on the test photos, even "
                         "without labels, would flatter the test metrics")
    if "source" in table and not (isinstance(table["source"], str) and table["source"]):
        raise StudyError(f"{where}: [pretraining] source must be a dataset spec or folder, got {table['source']!r}")
    if table and "ssl" not in study.pretraining_values():
        raise StudyError(f"{where}: a [pretraining] table is given but no trial can use it; add "
                         "[params.pretraining] with values [\"none\", \"ssl\"] or fix pretraining = \"ssl\"")
    for backbone in study.encoder_backbones():
        try:
            study.pretrain_config(backbone)
        except ConfigError as exc:
            raise StudyError(f"{where}: [pretraining]: {exc}") from exc


def _corner_values(p: Param) -> list[Any]:
    if p.type == "choice":
        return list(p.values)
    values = [p.low, p.high, *p.grid]
    if p.range_by:
        values += [b for bounds in p.range_by[1].values() for b in bounds]
    return sorted(set(values))
