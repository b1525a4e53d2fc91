"""Model families by name, each with the options it takes, and the one function that builds a model.

A family is a model class (an :class:`~iqa_ray.models.base.IQAModel` whose constructor takes a
backbone, the family's options as keyword arguments and ``loss``) and an options class (a frozen
:class:`~iqa_ray.core.options.Options` dataclass declared next to the model: its fields are
the family's config keys, with their defaults and validation). :func:`register_family` adds one;
the training config (:mod:`iqa_ray.training.config`) reads the registry, so a family's keys are config keys,
``--set`` keys and search-space parameters with nothing else to edit. The built-in families are
registered at the bottom of this module, then the user's plug-in modules are imported
(:mod:`iqa_ray.core.plugins`, ``IQA_RAY_PLUGINS``); unknown names fail loudly with the list of
valid ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from typing import Any

from iqa_ray.core.options import Options
from iqa_ray.core.plugins import load_plugins
from iqa_ray.models.backbones import SUPPORTED_BACKBONES, create_backbone
from iqa_ray.models.base import IQAModel
from iqa_ray.models.gmm import GMMIQA, GMMOptions
from iqa_ray.models.hyperiqa import HyperIQA, HyperIQAOptions
from iqa_ray.models.losses import RegressionLoss
from iqa_ray.models.mlp import MLPIQA, MLPOptions

__all__ = ["FAMILIES", "Family", "build_model", "family", "family_arguments", "family_keys", "register_family",
           "unregister_family"]


@dataclass(frozen=True)
class Family:
    """A registered model family.

    Attributes:
        name: the ``family`` config value.
        model: the model class.
        options: its options class (the family's config keys).
        pools_features: the head reads globally pooled backbone features, which a frozen-feature
            cache (``feature_cache = true``) can hold.
        seeded: the constructor takes ``random_state``, which the run's seed sets.
    """

    name: str
    model: type[IQAModel]
    options: type[Options]
    pools_features: bool = False
    seeded: bool = False


_FAMILIES: dict[str, Family] = {}
#: Family name -> model class, in registration order (a live view of the registry).
FAMILIES: dict[str, type[IQAModel]] = {}


def register_family(name: str, model: type[IQAModel], options: type[Options], *,
                    pools_features: bool = False) -> Family:
    """Register a model family, making its options config keys.

    Args:
        name: the ``family`` value that selects it.
        model: an :class:`IQAModel` subclass; ``model(backbone, loss=..., **options)`` builds it.
        options: a frozen :class:`Options` dataclass whose fields are the family's keys.
        pools_features: see :class:`Family`.

    Raises:
        ValueError: the name is taken, the classes are not of the right kind, the model does not
            take an option, or an option shares its name with another family's option of a
            different default (a flat key must mean one thing).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a family name must be an identifier, got {name!r}")
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} is already registered (by {_FAMILIES[name].model.__name__})")
    if not (isinstance(model, type) and issubclass(model, IQAModel)):
        raise ValueError(f"family {name!r}: model must be an IQAModel subclass, got {model!r}")
    if not (isinstance(options, type) and issubclass(options, Options) and dataclasses.is_dataclass(options)):
        raise ValueError(f"family {name!r}: options must be a frozen Options dataclass, got {options!r}")
    accepted = _keyword_arguments(model)
    missing = [k for k in options.names() if k not in accepted]
    if missing:
        raise ValueError(f"family {name!r}: {model.__name__} does not take the options {missing} as keyword arguments")
    defaults = options.defaults()
    for other in _FAMILIES.values():
        for key, value in other.options.defaults().items():
            if key in defaults and defaults[key] != value:
                raise ValueError(f"family {name!r}: option {key!r} defaults to {defaults[key]!r}, but family "
                                 f"{other.name!r} declares it with default {value!r}; a config key means one "
                                 "thing: rename it")
    spec = Family(name, model, options, pools_features=pools_features, seeded="random_state" in accepted)
    _FAMILIES[name] = spec
    FAMILIES[name] = model
    return spec


def unregister_family(name: str) -> None:
    """Remove a family (for tests and plug-ins that register one temporarily)."""
    family(name)
    del _FAMILIES[name]
    del FAMILIES[name]


def family(name: str) -> Family:
    """The registered family ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; valid families: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_keys() -> dict[str, tuple[str, ...]]:
    """Every family option (config key) -> the families that take it, in registration order."""
    out: dict[str, tuple[str, ...]] = {}
    for spec in _FAMILIES.values():
        for key in spec.options.names():
            out[key] = (*out.get(key, ()), spec.name)
    return out


def _keyword_arguments(model: type) -> list[str]:
    parameters = inspect.signature(model).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "loss"]


def family_arguments(name: str) -> list[str]:
    """The family-specific keyword arguments a family's model takes (everything but backbone and loss)."""
    return _keyword_arguments(family(name).model)


def build_model(
    family: str,
    *,
    backbone: str,
    pretrained: str | os.PathLike[str] = "none",
    frozen_backbone: bool = False,
    img_size: int | None = None,
    loss: RegressionLoss | None = None,
    trainable_stages: int | None = None,
    **family_kwargs: Any,
) -> IQAModel:
    """Build a quality model.

    Args:
        family: One of ``FAMILIES``: ``"mlp"``, ``"gmm"``, ``"hyperiqa"``.
        backbone: One of :data:`~iqa_ray.models.backbones.SUPPORTED_BACKBONES`.
        pretrained: Backbone weight source (see :func:`~iqa_ray.models.backbones.create_backbone`).
        frozen_backbone: Freeze the backbone.
        img_size: Input size, needed by fixed-size backbones (ViT, Swin).
        loss: Regression loss; L1 by default.
        trainable_stages: Train only the backbone's last this many feature stages (``None``: all).
        **family_kwargs: The family's own arguments (see :func:`family_arguments`).

    Returns:
        The model, in train mode.

    Raises:
        ValueError: Unknown family or backbone.
        TypeError: An argument the family does not take.
    """
    accepted = family_arguments(family)
    unknown = sorted(set(family_kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"family {family!r} got unexpected arguments {unknown}; it takes {accepted}")
    if backbone not in SUPPORTED_BACKBONES:
        create_backbone(backbone)  # raises the error that lists the valid names
    net = create_backbone(backbone, pretrained=pretrained, frozen=frozen_backbone, img_size=img_size,
                          trainable_stages=trainable_stages)
    return FAMILIES[family](net, loss=loss, **family_kwargs)


register_family("mlp", MLPIQA, MLPOptions, pools_features=True)
register_family("gmm", GMMIQA, GMMOptions)
register_family("hyperiqa", HyperIQA, HyperIQAOptions)
load_plugins()  # the user's families (IQA_RAY_PLUGINS), in every process that imports the registry
