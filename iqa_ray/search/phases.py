"""Where a search's time went: wall-clock seconds of each phase, in the order they ran.

A search spends time outside its trials too: starting Ray, pre-generating and decoding the images,
the frozen-feature pass, the refit of the selected configuration, scoring it on test, the baselines
beside it, ``--splits`` and writing the results. :class:`Phases` times each of these on the
driver; the summary prints them (:func:`describe`) and ``summary.json`` keeps them
(``phases``, ``total_s``), so a user sees where the time went. Work that overlaps another phase
(PIQE and BRISQUE run while the refit trains) counts in the phase that waits for it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

#: The phases, in the order a search runs them (a phase that did not run is left out).
PHASES = ("startup", "decoding", "features", "encoders", "search", "refit", "test", "baselines", "splits", "report")


class Phases:
    """Seconds per phase since the search started (:meth:`__call__` times one)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (added to it if it ran before)."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def record(self) -> dict[str, float]:
        """The phases that ran, in :data:`PHASES` order, rounded to 0.1 s (``summary.json``'s ``phases``)."""
        return {name: round(self.seconds[name], 1) for name in PHASES if name in self.seconds}

    def total(self) -> float:
        """Seconds since the search started."""
        return time.perf_counter() - self.started


def describe(phases: dict[str, float], total: float) -> str:
    """``time: startup 6 s, decoding 3 s, ...; total 70 s`` from a summary's ``phases`` and ``total_s``."""
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
    return f"time: {parts}; total {total:.0f} s"
