"""Errors raised for bad input data. Each message names the bad thing and what would be valid."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset on disk (images, label CSV, shards) is missing, malformed or inconsistent."""
