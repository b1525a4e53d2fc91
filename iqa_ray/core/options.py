"""The base every configuration builds on: one error type, validators, and a frozen options class
that is built from a mapping (unknown keys name the valid ones) and written back as plain data.

It sits in the lowest layer so that model families can declare their own options next to their
model (:mod:`iqa_ray.models.registry`) without importing the training config above them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["ConfigError", "Options", "require", "finite", "positive_int"]

T = TypeVar("T", bound="Options")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the valid values."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (every config's validator)."""
    if not condition:
        raise ConfigError(message)


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite int or float (``True``/``False`` are not numbers here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive_int(x: Any) -> bool:
    """Whether ``x`` is an integer >= 1 (``True`` is not)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of a frozen, validated group of options (subclass it as a frozen dataclass and validate
    in ``__post_init__`` with :func:`require`).

    Lists given for tuple-typed fields (JSON and TOML have no tuples) become tuples
    (:meth:`with_tuples`).
    """

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def with_tuples(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` with a list given for a field annotated as a tuple (``tuple[...]``, or
        ``tuple[...] | None``) made a tuple: the one rule for what JSON and TOML read as lists."""
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple[")}
        return {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default value."""
        return {k: v for k, v in dataclasses.asdict(cls()).items()}

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any] | None = None, *, what: str | None = None) -> T:
        """Build from a mapping of option names to values.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or an invalid value.
        """
        values = dict(values or {})
        unknown = sorted(k for k in values if k not in cls.names())
        if unknown:
            raise ConfigError(f"unknown {what or cls.__name__} keys {unknown}; valid keys: {list(cls.names())}")
        try:
            return cls(**cls.with_tuples(values))
        except TypeError as exc:  # a wrongly typed value that a comparison choked on
            raise ConfigError(f"{what or cls.__name__}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable; tuples stay tuples, which JSON writes as lists)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
