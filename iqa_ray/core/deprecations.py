"""Renamed keys, in one table: an old spelling is still read, with a FutureWarning naming the new one.

Two things were both called ``scheduler``: a run's learning-rate schedule (now ``lr_schedule``) and
a search's trial scheduler (now ``trial_scheduler``). Each context below maps its old keys to the
new ones; :func:`renamed_keys` applies a context to what a user wrote (giving both spellings is an
error) or, silently, to a record written before the rename. Command-line flags keep the old
spelling as an alias (:func:`old_flags`).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from iqa_ray.core.options import ConfigError

CONFIG = "config"  # run-config keys: configs, --set, a study's or recipe's [fixed] and [params], checkpoints
SEARCH = "search"  # a search's settings: a study's [study] table, `iqa-ray tune` flags, experiment.json

#: context -> {old key: (new key, the values both names take, as the warning lists them)}
RENAMED_KEYS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    # values: training.config_sections.LR_SCHEDULES (a run's learning-rate schedules)
    CONFIG: {"scheduler": ("lr_schedule", ("cosine", "step", "plateau", "none"))},
    SEARCH: {"scheduler": ("trial_scheduler", ("asha", "hyperband", "none"))},  # search.study.TRIAL_SCHEDULERS
}
# How each context words the warning and the error (a study's [study] table is the one place a search's
# settings are written by hand, so its messages name that table).
_WARNING = {
    CONFIG: "{where}: the key {old!r} is deprecated, use {new!r} (same values: {values}); it is read as {new!r} "
            "for now",
    SEARCH: "{where}: [study] {old} is deprecated, use {new} (same values: {values}); it is read as {new} for now",
}
_BOTH = {
    CONFIG: "{where}: both {old!r} (its old name) and {new!r} are given; keep {new!r}",
    SEARCH: "{where}: [study] has both {old!r} (its old name) and {new!r}; keep {new!r}",
}


def renamed_keys(values: Mapping[str, Any], context: str, where: str | None = None, *,
                 error: type[Exception] = ConfigError) -> dict[str, Any]:
    """``values`` with the old keys of ``context`` under their new names (in place, order kept).

    Args:
        values: what was written (a config, a table of a study file, ``--set`` values, a record).
        context: :data:`CONFIG` or :data:`SEARCH`.
        where: what ``values`` are, for the messages (a file, ``--set``, ``config``): each old key
            warns (FutureWarning naming the new one) and giving both spellings raises ``error``.
            ``None`` reads a record this program wrote before the rename (``experiment.json``):
            silently, the new key winning where both are there.
        error: the exception raised when both spellings are given.
    """
    out = dict(values)
    for old, (new, choices) in RENAMED_KEYS[context].items():
        if old not in out:
            continue
        if where is None:
            value = out.pop(old)
            out.setdefault(new, value)
            continue
        if new in out:
            raise error(_BOTH[context].format(where=where, old=old, new=new))
        warnings.warn(_WARNING[context].format(where=where, old=old, new=new, values=", ".join(choices)),
                      FutureWarning, stacklevel=3)
        out = {(new if k == old else k): v for k, v in out.items()}
    return out


def old_flags(context: str, key: str) -> tuple[str, ...]:
    """The command-line spellings of ``key``'s old names in ``context`` (``--scheduler``), kept as aliases."""
    return tuple("--" + old.replace("_", "-") for old, (new, _) in RENAMED_KEYS[context].items() if new == key)
