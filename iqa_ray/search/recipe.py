"""Recipes: what a protocol fixes, as data (one TOML file in ``recipes/``), beside a study.

A study says what is searched; a recipe says what the protocol holds constant: resize rule, crop
size, patches per image, test patches and their placement, backbone and weights, optimiser,
learning rates, batch size, epochs, split fractions and how many splits the result is reported on.
Each value in a recipe file cites its source in a comment. Format::

    [recipe]
    description = "..."
    splits = 10                 # default of --splits (re-train the selected config on N splits)

    [study]                     # the budget the protocol fixes (num_samples, max_epochs,
    max_epochs = 16             # grace_period, reduction_factor); flags still override it

    [fixed]                     # config keys, as in a study's [fixed]
    crop_size = 224

    [dataset.koniq10k]          # per dataset adapter, over [fixed]
    image_size = [512, 384]

Applying a recipe to a study (:func:`apply_recipe`): the study's fixed values, then the recipe's
(its ``[dataset.<adapter>]`` table last), then ``--set``. Keys the study searches stay searched
(the recipe's value for them is reported as not applied), and family-specific keys of the study
that the recipe's family does not take (``multiscale`` when the recipe trains an ``mlp``) are
dropped, listed in :attr:`AppliedRecipe.dropped`. The result is validated like a study file.

Built-in recipes: ``cpu`` (frozen features computed once, a head searched on them: the default
where no GPU is found) and ``paper`` (HyperIQA's published protocol, for GPUs). ``none`` applies
nothing: the study as written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomllib

from iqa_ray.core.deprecations import CONFIG, renamed_keys
from iqa_ray.core.options import ConfigError
from iqa_ray.data.catalog import BUNDLED
from iqa_ray.models.registry import family_keys
from iqa_ray.search.study import Study, StudyError
from iqa_ray.search.study_file import check_study
from iqa_ray.training.config import TrainConfig, valid_keys

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
NONE = "none"
AUTO = "auto"
_TABLES = {"recipe", "study", "fixed", "dataset"}
_RECIPE_KEYS = {"description", "splits"}
_BUDGET_KEYS = ("num_samples", "max_epochs", "grace_period", "reduction_factor")
# Keys that only mean something for real datasets read by an adapter (pre-generated data has its
# own split by source photo and its own sizes).
_REAL_ONLY = ("split_fractions", "image_size", "short_side")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe file."""

    name: str
    path: Path | None
    description: str
    splits: int
    budget: dict[str, int]
    fixed: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    definition: dict[str, Any] = field(default_factory=dict)

    def values_for(self, dataset: str) -> dict[str, Any]:
        """The config values this recipe sets for a dataset spec (its adapter's table over [fixed])."""
        adapter = dataset_adapter(dataset)
        values = {**self.fixed, **self.datasets.get(adapter or "", {})}
        if adapter is None:
            values = {k: v for k, v in values.items() if k not in _REAL_ONLY}
        return values


@dataclass(frozen=True)
class AppliedRecipe:
    """What applying a recipe did: the resulting study and every decision, for the printout and records."""

    recipe: Recipe
    study: Study
    applied: dict[str, Any]  # key -> value the recipe set
    searched: dict[str, Any]  # key -> recipe value not applied because the study searches the key
    dropped: dict[str, Any]  # study [fixed] key -> value dropped (family-specific, other family)
    not_applicable: list[str]  # recipe keys skipped for this dataset (real-dataset keys on pre-generated data)

    def describe(self) -> list[str]:
        r = self.recipe
        lines = [f"recipe {r.name}: {r.description}" + (f" ({r.path})" if r.path else "")]
        for key, value in sorted(self.applied.items()):
            lines.append(f"  {'recipe':10s} {key} = {value!r}")
        for key, value in sorted(self.searched.items()):
            lines.append(f"  {'searched':10s} {key} (the recipe's {value!r} not applied: the study searches it)")
        for key, value in sorted(self.dropped.items()):
            lines.append(f"  {'dropped':10s} {key} = {value!r} (the study's; family {self.study.fixed.get('family')!r} "
                         "does not take it)")
        for key in self.not_applicable:
            lines.append(f"  {'n/a':10s} {key} (real datasets only)")
        budget = ", ".join(f"{k}={v}" for k, v in r.budget.items())
        if budget:
            lines.append(f"  budget     {budget}")
        if r.splits:
            lines.append(f"  splits     {r.splits} (--splits default)")
        return lines

    def record(self) -> dict[str, Any]:
        """JSON form for experiment.json (what --resume re-applies)."""
        r = self.recipe
        return {"name": r.name, "file": str(r.path) if r.path else None, "definition": r.definition,
                "applied": self.applied, "searched": self.searched, "dropped": self.dropped,
                "not_applicable": self.not_applicable}


def dataset_adapter(spec: str) -> str | None:
    """The adapter name of an ``ADAPTER:ROOT`` spec or a bundled dataset's short name (aliases
    resolved), else ``None``."""
    if spec in BUNDLED:
        return BUNDLED[spec][0]
    if ":" not in spec or Path(spec).expanduser().exists():
        return None
    from iqa_ray.data.datasets.registry import resolve_dataset_name

    name = spec.split(":", 1)[0]
    try:
        return resolve_dataset_name(name)
    except ValueError:
        return name


def available_recipes(directory: Path = RECIPE_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_recipe(name_or_path: str | Path, directory: Path = RECIPE_DIR) -> Recipe:
    """Load and validate a recipe by name (``cpu``, ``paper``) or path.

    Raises:
        StudyError: missing file, bad TOML, unknown tables or keys, or values no config accepts.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = directory / f"{name_or_path}.toml"
    if not path.exists():
        raise StudyError(f"no recipe {str(name_or_path)!r} (looked for {path}); available: "
                         f"{[NONE, AUTO, *available_recipes(directory)]}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML: {exc}") from exc
    return parse_recipe(data, name=path.stem, path=path)


def parse_recipe(data: Mapping[str, Any], *, name: str, path: Path | None = None) -> Recipe:
    where = str(path) if path else name
    unknown = sorted(set(data) - _TABLES)
    if unknown:
        raise StudyError(f"{where}: unknown tables {unknown}; valid: [recipe], [study], [fixed], [dataset.<adapter>]")
    meta = dict(data.get("recipe", {}))
    bad = sorted(set(meta) - _RECIPE_KEYS)
    if bad:
        raise StudyError(f"{where}: unknown [recipe] keys {bad}; valid: {sorted(_RECIPE_KEYS)}")
    splits = meta.get("splits", 0)
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 0:
        raise StudyError(f"{where}: [recipe] splits must be an integer >= 0, got {splits!r}")
    budget = dict(data.get("study", {}))
    bad = sorted(set(budget) - set(_BUDGET_KEYS))
    if bad:
        raise StudyError(f"{where}: unknown [study] keys {bad}; a recipe fixes only the budget: {list(_BUDGET_KEYS)}")
    for key, value in budget.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StudyError(f"{where}: [study] {key} must be an integer >= 1, got {value!r}")
    try:  # renamed config keys (scheduler -> lr_schedule) still read, with a deprecation message
        fixed = renamed_keys(dict(data.get("fixed", {})), CONFIG, f"{where}: [fixed]")
        datasets = {str(k): renamed_keys(dict(v), CONFIG, f"{where}: [dataset.{k}]")
                    for k, v in dict(data.get("dataset", {})).items()}
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    keys = set(valid_keys())
    for table, values in [("[fixed]", fixed), *((f"[dataset.{k}]", v) for k, v in datasets.items())]:
        bad = sorted(k for k in values if k not in keys)
        if bad:
            raise StudyError(f"{where}: {table} keys {bad} are not config keys; valid: {sorted(keys)}")
        if "epochs" in values:
            raise StudyError(f"{where}: {table}: set the epoch budget with [study] max_epochs, not epochs")
        try:  # every table must make a valid config on its own, with [fixed] under it
            TrainConfig.from_dict({**fixed, **values})
        except ConfigError as exc:
            raise StudyError(f"{where}: {table}: {exc}") from None
    return Recipe(name=name, path=path, description=str(meta.get("description", "")), splits=splits,
                  budget=budget, fixed=fixed, datasets=datasets, definition={k: v for k, v in data.items()})


def foreign_family_keys(fixed: Mapping[str, Any], family: str, keep: Iterable[str] = ()) -> dict[str, Any]:
    """The keys of ``fixed`` that only other model families take (a study written for ``hyperiqa``
    fixes ``multiscale``), except those in ``keep``: what a switch to ``family`` drops."""
    takers, keep = family_keys(), set(keep)
    return {k: v for k, v in fixed.items() if k in takers and family not in takers[k] and k not in keep}


def apply_recipe(recipe: Recipe, study: Study, dataset: str, overrides: Mapping[str, Any] = ()) -> AppliedRecipe:
    """The study with the recipe's values for ``dataset`` fixed (see the module docstring).

    Args:
        recipe: the recipe.
        study: the study to apply it to.
        dataset: the dataset spec (selects the recipe's ``[dataset.<adapter>]`` table).
        overrides: the ``--set`` values (they win over the recipe; used here only to validate).

    Raises:
        StudyError: the combination is not a valid study; the message names the recipe.
    """
    values = recipe.values_for(dataset)
    not_applicable = sorted(set({**recipe.fixed, **recipe.datasets.get(dataset_adapter(dataset) or "", {})})
                            - set(values))
    searched_names = {p.name for p in study.params}
    applied = {k: v for k, v in values.items() if k not in searched_names}
    searched = {k: v for k, v in values.items() if k in searched_names}
    family = applied.get("family", study.fixed.get("family", TrainConfig().model.family))
    dropped = foreign_family_keys(study.fixed, family, keep=applied)
    fixed = {**{k: v for k, v in study.fixed.items() if k not in dropped}, **applied}
    budget = {k: v for k, v in recipe.budget.items()}
    if "grace_period" not in budget and "max_epochs" in budget:
        budget["grace_period"] = min(study.grace_period, budget["max_epochs"])
    result = replace(study, fixed=fixed, **budget)
    where = f"study {study.name!r} with recipe {recipe.name!r}"
    try:
        TrainConfig.from_dict({**fixed, **dict(overrides)})
    except ConfigError as exc:
        raise StudyError(f"{where}: {exc}") from None
    check_study(where, result)
    return AppliedRecipe(recipe=recipe, study=result, applied=applied, searched=searched, dropped=dropped,
                         not_applicable=not_applicable)


def recipe_conflict(recipe: Recipe, study: Study, dataset: str) -> str | None:
    """Why ``recipe`` cannot serve ``study`` (``None`` when it can).

    A recipe that trains another family than the one whose knobs the study searches (the cpu
    recipe's ``mlp`` for the ``gmm`` study's ``n_clusters``), or that computes one feature cache per
    search for a study that searches what the features depend on (``backbone``), would turn the
    study into something else; so would any combination that is not a valid study.
    """
    values = recipe.values_for(dataset)
    searched = {p.name for p in study.params}
    family = values.get("family") if "family" not in searched else None
    if family is not None:
        foreign = sorted(foreign_family_keys(dict.fromkeys(searched), family))
        if foreign:
            return (f"the study searches {', '.join(foreign)}, which the recipe's family {family!r} does not take")
    if values.get("feature_cache"):
        from iqa_ray.training.features import cache_keys

        cached = sorted(searched & set(cache_keys()))
        if cached:
            return (f"the recipe computes one frozen-feature cache per search, and the study searches "
                    f"{', '.join(cached)}, which changes the features")
    try:
        apply_recipe(recipe, study, dataset)
    except StudyError as exc:
        return str(exc)
    return None


def _built_in(study: Study) -> bool:
    from iqa_ray.search.study_file import STUDY_DIR

    return study.path is not None and Path(study.path).resolve().parent == STUDY_DIR.resolve()


def default_recipe(gpus_flag: float | None) -> str:
    """``cpu`` where no GPU is found, else ``paper``.

    ``--gpus N`` decides when given (N > 0: paper); otherwise whether this machine has a CUDA
    device (a cluster reached with ``--address`` whose GPUs this machine cannot see needs
    ``--gpus N`` or ``--recipe paper``).
    """
    if gpus_flag is not None:
        return "paper" if gpus_flag > 0 else "cpu"
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"


def resolve_recipe(name: str | None, gpus_flag: float | None, study: Study | None = None,
                   dataset: str | None = None) -> tuple[Recipe | None, str | None]:
    """The recipe a launch uses, and a note when the default one was set aside.

    ``none`` gives no recipe. ``auto`` (or no ``--recipe``) picks :func:`default_recipe` for the
    studies that ship in ``search_spaces/`` (a study file of your own runs as written unless a
    recipe is named); when that recipe cannot serve the study (:func:`recipe_conflict`), the study
    runs as written and the note says why. A recipe named explicitly that cannot serve the study is
    an error.

    Raises:
        StudyError: an unknown recipe, or an explicit one that conflicts with the study.
    """
    if name == NONE:
        return None, None
    explicit = name not in (None, AUTO)
    if not explicit and study is not None and not _built_in(study):
        return None, None  # a study file of your own is your protocol: a recipe applies when you name one
    recipe = load_recipe(name if explicit else default_recipe(gpus_flag))
    if study is None or dataset is None:
        return recipe, None
    conflict = recipe_conflict(recipe, study, dataset)
    if conflict is None:
        return recipe, None
    if explicit:
        raise StudyError(f"recipe {recipe.name!r} cannot serve study {study.name!r}: {conflict}; use --recipe none "
                         "(the study as written) or another recipe")
    return None, (f"recipe {recipe.name} (the default here) not applied: {conflict}; the study runs as written "
                  "(--recipe none to silence this, or --recipe NAME to choose)")


__all__ = ["Recipe", "AppliedRecipe", "load_recipe", "parse_recipe", "apply_recipe", "resolve_recipe",
           "default_recipe", "recipe_conflict", "available_recipes", "dataset_adapter", "RECIPE_DIR"]
