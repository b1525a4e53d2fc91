"""Frozen, validated configuration of one training run: data, model, optimisation.

One config type per concern (:mod:`iqa_ray.training.config_sections`: data, model, optimisation),
each a frozen dataclass on the config base (:class:`iqa_ray.core.options.Options`, as are the
families' options, the pre-training config and the pre-generation config) validated when it is
built, so a bad value fails before any work starts with a :class:`ConfigError` naming the key and
what is valid. :class:`TrainConfig` holds one of each. Search spaces and
the command line speak in *flat* keys (``lr``, ``alpha``, ``n_clusters``, ...): every field name is
unique across the three sections, and :meth:`TrainConfig.from_dict` routes each key to its section
(nested ``{"data": {...}, "model": {...}, "optim": {...}}`` works too). The resolved config is
written next to every result (:meth:`TrainConfig.to_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from iqa_ray.core.deprecations import CONFIG, renamed_keys
from iqa_ray.core.options import ConfigError, require
from iqa_ray.models.registry import FAMILIES, family, family_keys
from iqa_ray.training.config_sections import DataConfig, ModelConfig, OptimConfig

__all__ = ["TrainConfig", "feature_cache_families", "valid_keys"]


def feature_cache_families() -> tuple[str, ...]:
    """Families whose head reads pooled features, which a frozen-feature cache can hold."""
    return tuple(name for name in FAMILIES if family(name).pools_features)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig}
# The keys of the sections' own fields (a family's options are model keys too: see _key_sections).
_KEY_SECTION = {f.name: section for section, cls in _SECTIONS.items() for f in fields(cls) if f.name != "options"}
assert len(_KEY_SECTION) == sum(len(fields(c)) for c in _SECTIONS.values()) - 1, "config field names must be unique"


def _key_sections() -> dict[str, str]:
    """Every flat key -> its section, the registered families' options included (as ``model``)."""
    out = dict(_KEY_SECTION)
    for key, takers in family_keys().items():
        if key in _KEY_SECTION:
            raise ConfigError(f"family {takers[0]!r} declares the option {key!r}, which is already the config key "
                              f"{key!r} of the {_KEY_SECTION[key]} section; rename the option")
        out[key] = "model"
    return out


@dataclass(frozen=True)
class TrainConfig:
    """The whole resolved configuration of one training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.data.feature_cache:
            if not self.model.frozen_backbone:
                raise ConfigError("feature_cache needs frozen_backbone = true (cached features are the frozen "
                                  "backbone's); set frozen_backbone = true or feature_cache = false")
            if self.model.family not in feature_cache_families():
                raise ConfigError(f"feature_cache works with family {'/'.join(feature_cache_families())} (a head "
                                  f"on pooled features), not {self.model.family!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> TrainConfig:
        """Build from flat keys (``{"lr": 1e-3, "alpha": 0.3}``), nested sections, or both.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or an invalid value.
        """
        merged: dict[str, Any] = {}
        for source in (values or {}, overrides):
            for key, value in source.items():
                if key in _SECTIONS and isinstance(value, Mapping):
                    merged.update(value)
                else:
                    merged[key] = value
        merged = renamed_keys(merged, CONFIG, "config")  # old keys (iqa_ray.core.deprecations) still read
        sections = _key_sections()
        unknown = sorted(k for k in merged if k not in sections)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(sections)}")
        chosen = merged.get("family", ModelConfig.family)
        require(chosen in FAMILIES, f"unknown model family {chosen!r}; valid: {', '.join(FAMILIES)}")
        own = set(family(chosen).options.names())
        parts: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        options: dict[str, Any] = {}
        for key, value in merged.items():
            if key in own:
                options[key] = value
            elif key in _KEY_SECTION:
                parts[_KEY_SECTION[key]][key] = value
            else:
                # Another family's key: at its default it is the untouched value of a full config
                # written by to_dict before (harmless); set away from it, it is almost always a
                # mistake in a search space (e.g. n_clusters searched for an mlp).
                takers = family_keys()[key]
                options_class = family(takers[0]).options
                if options_class.with_tuples({key: value})[key] != options_class.defaults()[key]:
                    raise ConfigError(f"{key} applies to family {'/'.join(takers)} only, not {chosen!r}")
        parts["model"]["options"] = options
        try:
            return cls(**{s: _SECTIONS[s](**_SECTIONS[s].with_tuples(kw)) for s, kw in parts.items()})
        except TypeError as exc:  # a wrongly typed value that a comparison choked on
            raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain-data form (JSON-serialisable), written next to every result: each section's
        keys, the model section with its family's options (not other families' keys)."""
        return {"data": dataclasses.asdict(self.data), "model": self.model.to_dict(), "optim": dataclasses.asdict(self.optim)}

    def flat(self) -> dict[str, Any]:
        """All fields as one flat dict (the form search spaces and exports use)."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    def replace(self, **flat_overrides: Any) -> TrainConfig:
        """A copy with some flat keys changed (validated again)."""
        return TrainConfig.from_dict(self.flat(), **flat_overrides)


def valid_keys() -> list[str]:
    """Every flat config key (every registered family's options included)."""
    return sorted(_key_sections())
