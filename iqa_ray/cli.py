"""Shared command-line helpers: argument types and Ray start-up. Only launchers import this."""

from __future__ import annotations

import argparse
import os
from typing import Any


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> dict[str, float]:
    """Connect to ``address`` or start a local Ray instance bound to 127.0.0.1; return its resources.

    The dashboard is not started (it would open a port); Ray's own logs stay in its temp folder.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    init_kwargs: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True, "log_to_driver": True}
    if address:
        init_kwargs["address"] = address
    else:
        init_kwargs["num_cpus"] = num_cpus
        init_kwargs["_node_ip_address"] = "127.0.0.1"
    init_kwargs.update(kwargs)
    ray.init(**init_kwargs)
    return ray.cluster_resources()
