"""Errors raised for bad input: data on disk, and launch requests. Each message names the bad thing and
what would be valid."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset on disk (images, label CSV, shards) is missing, malformed or inconsistent."""


class PreflightError(DatasetError):
    """A search would fail once started (decoded data too big, weights out of reach); refused now."""


class LaunchError(RuntimeError):
    """A launch request that cannot work (flags, resources, the cluster); the message says why and what would."""
