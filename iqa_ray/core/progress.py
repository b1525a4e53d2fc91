"""What the console shows: progress bars on stderr, and Ray Data's per-operator chatter kept in its log file.

Progress bars are tqdm's, on stderr, so stdout stays what a script may parse. tqdm's own environment
switches apply (``TQDM_DISABLE=1`` turns every bar off, ``TQDM_MININTERVAL=5`` redraws less often).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

RAY_DATA_LOGGER = "ray.data"


def progress_bar(total: int | None, desc: str, unit: str = "img", **kwargs: Any) -> Any:
    """A tqdm bar on stderr (``total=None``: a counter without a percentage)."""
    from tqdm import tqdm

    # tqdm's monitor thread redraws a bar that has been idle for 10 s without taking the output
    # lock, which can cut a message printed above the bar (tqdm.external_write_mode) in two.
    tqdm.monitor_interval = 0
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, **kwargs)


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Run Ray Data without its console output; restore the settings afterwards.

    Ray Data prints an execution plan, a progress bar per operator and, when stdout is not a
    terminal, a block of ``INFO logging_progress.py`` lines every few seconds. Here its progress
    bars and start-of-execution message are off and its *console* handler lets through warnings
    and errors only; its file handler (``<ray session>/logs/ray-data/ray-data.log``) keeps every
    record, so nothing is lost.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved_ctx = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    logger = logging.getLogger(RAY_DATA_LOGGER)
    consoles = [h for h in logger.handlers if _is_console(h)]
    saved_levels = [h.level for h in consoles]
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved_ctx
        for handler, level in zip(consoles, saved_levels):
            handler.setLevel(level)


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (not to a file)."""
    if isinstance(handler, logging.FileHandler) or "File" in type(handler).__name__:
        return False
    stream = getattr(handler, "stream", None)
    return stream is None or stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) or \
        getattr(handler, "name", None) == "console"
