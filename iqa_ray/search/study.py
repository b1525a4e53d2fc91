"""The study type: a search written as data, validated, and what each searcher and trial reads of it.

A :class:`Study` comes from a study file (one TOML file in ``search_spaces/``), read and checked
by :mod:`iqa_ray.search.study_file`, which describes the format. It gives each searcher its space
(:meth:`Study.tune_space`, :meth:`Study.grid_space`, :meth:`Study.optuna_space`), maps a trial's
config to run-config keys (:meth:`Study.resolve`: unit values into their ranges, ``pretraining =
"ssl"`` into the encoder prepared for the trial's backbone) and describes itself for the console.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from iqa_ray.core.options import ConfigError
from iqa_ray.core.selection import SelectionRule
from iqa_ray.training.config import TrainConfig

#: Search algorithms and trial schedulers a study (or the command line) may name.
SEARCHERS = ("optuna", "random", "grid")
# a study's `trial_scheduler` (a run's LR schedules: training.config_sections.LR_SCHEDULES)
TRIAL_SCHEDULERS = ("asha", "hyperband", "none")
UNIT_SUFFIX = "__unit"
PRETRAINING = "pretraining"  # study-only key: "none" or "ssl" (resolved to pretrained_encoder)
_PRETRAINING_DATA_KEYS = {"source", "splits"}  # [pretraining] keys that are not PretrainConfig fields
# The keys that say which model trains (what a study's description is about): a recipe or --set that
# changes one of them makes the study file's description wrong, and the console says what trains instead.
# (Other weights for the same model, `pretrained`, leave a description true.)
MODEL_KEYS = ("family", "backbone", "frozen_backbone", "trainable_stages", "loss")


class StudyError(ConfigError):
    """A study file is malformed; the message names the file, the key and what is valid."""


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter."""

    name: str
    role: str
    type: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()
    grid: tuple[Any, ...] = ()
    range_by: tuple[str, dict[Any, tuple[float, float]]] | None = None
    description: str = ""

    @property
    def searched_name(self) -> str:
        """The key the searcher sees (``<name>__unit`` for parameters with a ``range_by``)."""
        return self.name + UNIT_SUFFIX if self.range_by else self.name


@dataclass(frozen=True)
class Study:
    """A validated study."""

    name: str
    path: Path | None
    description: str
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    metric: str = "val_srcc"
    mode: str = "max"
    num_samples: int = 12
    max_epochs: int = 6
    grace_period: int = 1
    reduction_factor: int = 3
    searcher: str = "optuna"
    trial_scheduler: str = "asha"
    seed: int = 0
    roles: dict[str, str] = field(default_factory=dict)
    definition: dict[str, Any] = field(default_factory=dict)  # the parsed file, as written
    pretraining: dict[str, Any] = field(default_factory=dict)  # the [pretraining] table
    encoders: dict[str, str] = field(default_factory=dict)  # backbone -> SSL encoder file (set by the launcher)
    # Several objectives (accuracy against cost): (metric, mode) pairs, the primary one first; a
    # single-objective study has just (metric, mode). See iqa_ray.core.selection.
    objectives: tuple[tuple[str, str], ...] = ()
    select: str = "best"  # which trial is handed back: best | knee | <cost> <= <value> (selection.SelectionRule)
    sampler: str = "tpe"  # the optuna searcher's sampler: tpe | nsga2

    def __post_init__(self) -> None:
        if not self.objectives:
            object.__setattr__(self, "objectives", ((self.metric, self.mode),))

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def selection_rule(self) -> SelectionRule:
        """How the search picks the trial it hands back (:mod:`iqa_ray.core.selection`)."""
        return SelectionRule.parse(self.objectives, self.select)

    def with_select(self, select: str) -> "Study":
        """This study with another selection rule (``--select``), validated."""
        try:
            SelectionRule.parse(self.objectives, select)
        except ValueError as exc:
            raise StudyError(f"--select: {exc}") from None
        return replace(self, select=str(select))

    # ------------------------------------------------------------------ pre-training

    def pretraining_values(self) -> tuple[str, ...]:
        """The values ``pretraining`` can take in this study (``("none",)`` when it is not used)."""
        searched = next((p for p in self.params if p.name == PRETRAINING), None)
        if searched is not None:
            return tuple(searched.values)
        return (str(self.fixed.get(PRETRAINING, "none")),)

    def backbones(self) -> tuple[str, ...]:
        """Every backbone a trial of this study can use."""
        searched = next((p for p in self.params if p.name == "backbone"), None)
        if searched is not None:
            return tuple(searched.values)
        return (str(self.fixed.get("backbone", TrainConfig().model.backbone)),)

    def encoder_backbones(self) -> tuple[str, ...]:
        """Backbones that need a pre-trained SSL encoder before the search starts (may be empty)."""
        return self.backbones() if "ssl" in self.pretraining_values() else ()

    def pretrain_config(self, backbone: str) -> Any:
        """The :class:`~iqa_ray.ssl.config.PretrainConfig` of ``backbone``'s encoder (from ``[pretraining]``)."""
        from iqa_ray.ssl.config import PretrainConfig

        values = {k: v for k, v in self.pretraining.items() if k not in _PRETRAINING_DATA_KEYS}
        # The encoder starts where the trials' backbones would (e.g. the offline ImageNet weights).
        values.setdefault("pretrained", self.fixed.get("pretrained", TrainConfig().model.pretrained))
        return PretrainConfig.from_dict(values, backbone=backbone)

    def with_encoders(self, encoders: Mapping[str, str]) -> "Study":
        """This study with the SSL encoder file of each backbone (what ``pretraining = "ssl"`` loads)."""
        return replace(self, encoders=dict(encoders))

    # ------------------------------------------------------------------ spaces for each searcher

    def tune_space(self) -> dict[str, Any]:
        """Ray Tune sampling space (random search): fixed values plus one sampler per parameter."""
        from ray import tune

        space: dict[str, Any] = dict(self.fixed)
        space["epochs"] = self.max_epochs
        for p in self.params:
            if p.range_by:
                space[p.searched_name] = tune.uniform(0.0, 1.0)
            elif p.type == "uniform":
                space[p.name] = tune.uniform(p.low, p.high)
            elif p.type == "loguniform":
                space[p.name] = tune.loguniform(p.low, p.high)
            elif p.type == "int":
                space[p.name] = tune.randint(int(p.low), int(p.high) + 1)
            elif p.type == "logint":
                space[p.name] = tune.lograndint(int(p.low), int(p.high) + 1)
            else:
                space[p.name] = tune.choice(list(p.values))
        return space

    def grid_space(self) -> dict[str, Any]:
        """Ray Tune grid: every combination of the parameters' ``grid`` values."""
        from ray import tune

        missing = [p.name for p in self.params if not p.grid]
        if missing:
            raise StudyError(f"study {self.name!r}: the grid searcher needs `grid = [...]` for {missing}")
        space: dict[str, Any] = dict(self.fixed)
        space["epochs"] = self.max_epochs
        for p in self.params:
            space[p.name] = tune.grid_search(list(p.grid))
        return space

    def grid_size(self) -> int:
        return math.prod(len(p.grid) for p in self.params) if all(p.grid for p in self.params) else 0

    def optuna_space(self) -> dict[str, Any]:
        """Optuna distributions of the searched keys (fixed values go to Tune's param_space)."""
        from optuna import distributions as d

        space: dict[str, Any] = {}
        for p in self.params:
            if p.range_by:
                space[p.searched_name] = d.FloatDistribution(0.0, 1.0)
            elif p.type in ("uniform", "loguniform"):
                space[p.name] = d.FloatDistribution(p.low, p.high, log=p.type == "loguniform")
            elif p.type in ("int", "logint"):
                space[p.name] = d.IntDistribution(int(p.low), int(p.high), log=p.type == "logint")
            else:
                space[p.name] = d.CategoricalDistribution(list(p.values))
        return space

    def constants(self) -> dict[str, Any]:
        """What every trial gets besides the searched keys."""
        return {**self.fixed, "epochs": self.max_epochs}

    # ------------------------------------------------------------------ trial config -> run config

    def resolve(self, trial_config: Mapping[str, Any]) -> dict[str, Any]:
        """Flat :class:`TrainConfig` keys of a trial: unit values mapped into their ranges."""
        out = {k: v for k, v in trial_config.items() if not k.endswith(UNIT_SUFFIX) and k != PRETRAINING}
        if trial_config.get(PRETRAINING, self.fixed.get(PRETRAINING, "none")) == "ssl":
            backbone = out.get("backbone", self.fixed.get("backbone", TrainConfig().model.backbone))
            if backbone not in self.encoders:
                raise StudyError(f"study {self.name!r}: pretraining = 'ssl' but no pre-trained encoder was prepared for "
                                 f"backbone {backbone!r} (prepared: {sorted(self.encoders)}); the launcher pre-trains "
                                 "them before the search (iqa_ray.search.encoders.prepare_encoders)")
            out["pretrained_encoder"] = self.encoders[backbone]
        for p in self.params:
            if not p.range_by or p.searched_name not in trial_config:
                continue
            by, ranges = p.range_by
            choice = out.get(by, self.fixed.get(by))
            if choice not in ranges:
                raise StudyError(f"study {self.name!r}: {p.name} has no range for {by}={choice!r}; ranges: {sorted(ranges)}")
            lo, hi = ranges[choice]
            u = float(trial_config[p.searched_name])
            out[p.name] = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if p.type == "loguniform" \
                else lo + u * (hi - lo)
        return out

    def reported_config(self, trial_config: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's config as reports show it: :meth:`resolve`, plus the study-only keys it
        searched (``pretraining``), which resolve into others and would otherwise vanish."""
        out = self.resolve(trial_config)
        out.update({p.name: trial_config[p.name] for p in self.params if p.name not in out and p.name in trial_config})
        return out

    def trains(self) -> dict[str, Any]:
        """The model this study's trials train (:func:`model_record` of its fixed values and searched keys)."""
        return model_record(self.fixed, {p.name: list(p.values or p.grid) for p in self.params})

    def changed_model_keys(self) -> list[str]:
        """The :data:`MODEL_KEYS` whose value differs from the study file's own (a recipe or ``--set``
        changed them); empty for a study built without a file's definition."""
        written = self.definition.get("fixed")
        if not isinstance(written, Mapping):
            return []
        searched = {p.name for p in self.params}
        default = TrainConfig().model
        return [k for k in MODEL_KEYS if k not in searched
                and self.fixed.get(k, getattr(default, k)) != written.get(k, getattr(default, k))]

    def describe(self, changed_by: str | None = None) -> list[str]:
        """The study as it runs, for the console: what trains, what is optimised and searched.

        The study file's description heads it unless a recipe or ``--set`` (``changed_by``, e.g.
        ``"recipe cpu"``) changed which model trains (:meth:`changed_model_keys`): a description of
        HyperIQA above an MLP head would mislead.
        """
        goal = " and ".join(f"{m} ({d})" for m, d in self.objectives)
        if self.multi_objective:
            goal += f", sampler {self.sampler}"
        if self.multi_objective or self.select != "best":
            goal += f"; hand back the {self.selection_rule.describe()}"
        changed = self.changed_model_keys()
        head = (f"study {self.name}, as {changed_by or 'this launch'} changes it ({', '.join(changed)}; the study "
                "file's description no longer applies)" if changed else f"study {self.name}: {self.description}")
        lines = [head, f"  {'trains':10s} {describe_model(self.trains())}",
                 f"  optimise {goal}; {self.num_samples} samples, up to {self.max_epochs} epochs"]
        for p in self.params:
            rng = (f"{p.values}" if p.type == "choice" else f"[{p.low}, {p.high}]")
            if p.range_by:
                rng = f"by {p.range_by[0]}: " + ", ".join(f"{k}=[{a:g}, {b:g}]" for k, (a, b) in p.range_by[1].items())
            lines.append(f"  {p.role:10s} {p.name} ~ {p.type} {rng}")
        for k, v in self.fixed.items():
            lines.append(f"  {'fixed':10s} {k} = {v!r}")
        if self.encoder_backbones():
            table = {k: v for k, v in self.pretraining.items()}
            lines.append(f"  pre-training of the ssl encoder ({', '.join(self.encoder_backbones())}): {table}")
        return lines


def model_record(values: Mapping[str, Any], searched: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """Which model a run trains, in the terms a reader asks about.

    Args:
        values: config keys (a study's fixed values, or one trial's resolved config); unset keys
            take :class:`TrainConfig`'s defaults.
        searched: searched keys and the values they may take (a study's parameters).

    Returns:
        ``family``, ``backbone``, ``pretrained`` (the weights it starts from), ``pretraining``
        (``ssl``: a self-supervised encoder on them), ``backbone_training`` (``frozen``, ``fine-tuned``,
        ``last N stages fine-tuned``), ``feature_cache`` (features computed once) and ``loss``; a
        searched key holds ``{"searched": [values]}``.
    """
    default, searched = TrainConfig().model, searched or {}

    def value(key: str, fallback: Any) -> Any:
        if key in searched:
            return {"searched": list(searched[key])}
        return values.get(key, fallback)

    stages = value("trainable_stages", default.trainable_stages)
    if values.get("frozen_backbone", default.frozen_backbone) and "frozen_backbone" not in searched:
        training: Any = "frozen"
    elif isinstance(stages, dict) or "frozen_backbone" in searched:
        training = {"searched": list(searched.get("trainable_stages", searched.get("frozen_backbone", [])))}
    elif stages is None:
        training = "fine-tuned"
    else:
        training = "frozen" if stages == 0 else f"last {stages} stage{'s' if stages > 1 else ''} fine-tuned"
    return {"family": value("family", default.family), "backbone": value("backbone", default.backbone),
            "pretrained": str(value("pretrained", default.pretrained)) if "pretrained" not in searched
            else value("pretrained", None), "pretraining": value(PRETRAINING, "ssl" if values.get("pretrained_encoder") else "none"),
            "backbone_training": training, "feature_cache": bool(values.get("feature_cache", False)),
            "loss": value("loss", default.loss)}


def describe_model(record: Mapping[str, Any]) -> str:
    """One line of :func:`model_record`: ``mlp on efficientnet_lite0 (offline weights, frozen, features
    computed once), loss ranking``."""

    def text(value: Any, name: str) -> str:
        if isinstance(value, dict):
            return f"{name} searched over {' | '.join(str(v) for v in value['searched'])}"
        return str(value)

    training = record["backbone_training"]
    training = (f"frozen depth searched over trainable_stages {' | '.join(str(v) for v in training['searched'])}"
                if isinstance(training, dict) else training)
    weights = record["pretrained"]
    weights = (text(weights, "weights") if isinstance(weights, dict) else "random weights" if weights == "none"
               else f"{weights} weights")
    pretraining = record.get("pretraining", "none")
    if pretraining != "none":
        weights += (", " + text(pretraining, "pretraining") if isinstance(pretraining, dict)
                    else " pre-trained further by self-supervision (ssl)")
    cache = ", features computed once" if record["feature_cache"] else ""
    return (f"{text(record['family'], 'family')} on {text(record['backbone'], 'backbone')} ({weights}, {training}"
            f"{cache}), loss {text(record['loss'], 'loss')}")
