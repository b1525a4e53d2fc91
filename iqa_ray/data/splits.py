"""Deterministic train / val / test splits by content group (never by crop or image).

Every image carries a ``group``: the source photo it was cut from (embedded set, folders), the
reference image of a synthetic distortion (KADID-10k), or the prompt that generated it
(AGIQA-3K). Splitting whole groups means no content appears in two splits, so a test score
measures generalisation to unseen content rather than memorised photos.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")
# train/val/test of the embedded photos (real datasets: iqa_ray.data.datasets.table.REAL_FRACTIONS)
EMBEDDED_FRACTIONS = (0.6, 0.2, 0.2)


def validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Check that ``fractions`` are three non-negative numbers summing to 1."""
    if len(fractions) != 3:
        raise ValueError(f"split fractions must be (train, val, test), got {tuple(fractions)!r}")
    values = tuple(float(f) for f in fractions)
    if any(not np.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {values!r}")
    return values  # type: ignore[return-value]


def assign_group_splits(
    groups: Iterable[str],
    fractions: Sequence[float] = EMBEDDED_FRACTIONS,
    seed: int = 0,
    strata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign each distinct group to a split, deterministically for (groups, fractions, seed).

    Groups are sorted before a seeded permutation, so the result does not depend on input
    order. With at least three groups (per stratum) and all fractions > 0, every split receives
    at least one group: an empty validation or test split would make model selection or
    reporting silently meaningless.

    Args:
        groups: group names (duplicates allowed; each distinct name is assigned once).
        fractions: target share of *groups* for train, val and test.
        seed: seed of the permutation.
        strata: optional stratum of each group (e.g. "grey" / "colour"); each stratum is split
            by the fractions on its own, so every split gets its share of each kind. Without
            it, a small set can put every photo of one kind in one split (the embedded set once
            drew four grey photos as its whole test split).

    Returns:
        Mapping from group name to "train", "val" or "test".
    """
    fr = validate_fractions(fractions)
    unique = sorted(set(groups))
    if not unique:
        raise ValueError("cannot split an empty set of groups")
    by_stratum: dict[str, list[str]] = {}
    for g in unique:
        by_stratum.setdefault(strata[g] if strata is not None else "", []).append(g)
    assignment: dict[str, str] = {}
    for k, stratum in enumerate(sorted(by_stratum)):
        members = by_stratum[stratum]
        order = np.random.default_rng([seed, k]).permutation(len(members)) if strata is not None \
            else np.random.default_rng(seed).permutation(len(members))
        start = 0
        for split, count in zip(SPLITS, _split_counts(len(members), fr)):
            for idx in order[start : start + count]:
                assignment[members[idx]] = split
            start += count
    return assignment


def _split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder rounding of ``n * fractions``, keeping each non-zero split non-empty."""
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    remainders = sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in remainders[: n - sum(counts)]:
        counts[i] += 1
    if n >= 3:
        for i in range(3):
            if fractions[i] > 0 and counts[i] == 0:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts
