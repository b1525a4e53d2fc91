"""Plug-ins: modules of the user's own that register model families or dataset layouts, imported
by iqa-ray itself so that every process sees them, the launcher's driver and every Ray worker alike.

Name them in the environment variable ``IQA_RAY_PLUGINS`` (comma-separated importable module
names, e.g. ``IQA_RAY_PLUGINS=mylab.iqa_plugins``). Each is imported once, when the family registry
or the dataset registry is first imported, after the built-ins are registered; a plug-in calls
:func:`iqa_ray.models.registry.register_family` or
:func:`iqa_ray.data.datasets.registry.register_layout` at its top level.
:func:`iqa_ray.search.cluster.init_ray` passes the variable on to Ray's workers.
"""

from __future__ import annotations

import importlib
import os

__all__ = ["PLUGINS_ENV", "PluginError", "load_plugins", "plugin_modules"]

PLUGINS_ENV = "IQA_RAY_PLUGINS"


class PluginError(ImportError):
    """A module named in ``IQA_RAY_PLUGINS`` cannot be imported; the message names it."""


def plugin_modules() -> list[str]:
    """The module names ``IQA_RAY_PLUGINS`` lists (empty entries ignored)."""
    return [name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]


def load_plugins() -> list[str]:
    """Import every plug-in module (each once: Python keeps imported modules); return their names.

    Raises:
        PluginError: a named module cannot be imported (the message names it and the variable).
    """
    names = plugin_modules()
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(f"{PLUGINS_ENV} names the module {name!r}, which cannot be imported ({exc}); set "
                              f"{PLUGINS_ENV} to comma-separated importable module names (e.g. mylab.iqa_plugins), "
                              "installed or on PYTHONPATH in every process that trains") from exc
    return names
