"""Ensemble selection over a search's trials: which trials a search hands back together, and with what weights.

Greedy forward selection with replacement (Caruana, Niculescu-Mizil, Crew and Ksikes, "Ensemble
selection from libraries of models", ICML 2004; auto-sklearn's ``EnsembleSelection``): the library
is the trials' validation predictions at the epoch whose weights each keeps; the ensemble starts
with the single best trial; each further round adds, with replacement, the trial whose addition
gives the best validation score of the averaged predictions. A trial added ``c`` times of ``n``
gets weight ``c / n``. Of the nested ensembles the rounds build, the best on validation is returned
(the paper's rule; the shortest of equals), so the ensemble is never worse on validation than the
best single trial. Only validation predictions are read: test photos play no part in the selection.

Scores are averaged as they are, with no per-trial rescaling: every loss a head trains with
(:mod:`iqa_ray.models.losses`: L1, MSE, and the ranking loss mixed with L1) is computed on the MOS
scale, and every head reports ``label_mean + label_std * z`` (:mod:`iqa_ray.models.base`), so the
members' scores share the label's scale and their weighted mean stays on it (what ``iqa-ray score``
promises). The one loss without an anchor, the ranking loss at ``alpha = 1``, is free only in its
offset, which shifts a weighted mean by a constant and changes none of its correlations.

Ties are broken by the trial id (the smallest wins), whatever order the library is given in.

The ensemble a search hands back is written as a manifest (:func:`manifest`, ``ensemble.json``:
each member's trial folder and weight), which :func:`read_manifest` checks and
:mod:`iqa_ray.evaluation.ensemble` loads as one model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from iqa_ray.core.metrics import krcc, plcc, srcc

__all__ = ["ENSEMBLE_FILE", "ENSEMBLE_METRICS", "caruana_select", "ensemble_predictions", "is_manifest", "manifest",
           "read_manifest"]

#: What ensemble selection may maximise: the validation metric a study selects on -> the correlation.
ENSEMBLE_METRICS: dict[str, Callable[..., float]] = {
    "val_srcc": srcc, "best_val_srcc": srcc, "val_plcc": plcc, "val_krcc": krcc,
}


def ensemble_predictions(predictions: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The weighted mean of the members' predictions (``weights`` sum to 1), summed in trial-id order."""
    members = sorted(weights)
    total = np.zeros_like(np.asarray(predictions[members[0]], dtype=np.float64))
    for trial in members:
        total = total + float(weights[trial]) * np.asarray(predictions[trial], dtype=np.float64)
    return total


def _score(metric: Callable[..., float], pred: np.ndarray, mos: np.ndarray) -> float:
    value = float(metric(pred, mos))
    return value if math.isfinite(value) else -math.inf


def caruana_select(val_predictions: Mapping[str, np.ndarray], mos: np.ndarray, rounds: int,
                   metric: Callable[..., float] = srcc) -> dict[str, float]:
    """Greedy ensemble selection with replacement; trial id -> weight (the weights sum to 1).

    Args:
        val_predictions: trial id -> its predictions of the validation photos (the same photos, in
            the same order, for every trial).
        mos: those photos' MOS.
        rounds: greedy rounds (>= 1): the first takes the single best trial, each later one adds a
            trial; 1 hands back the best trial alone.
        metric: what is maximised (higher is better), ``metric(pred, mos) -> float``; a non-finite
            value never wins.

    Raises:
        ValueError: ``rounds`` below 1, an empty library, predictions of another length than
            ``mos``, or a trial with non-finite predictions (named).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a whole number >= 1 (greedy rounds of ensemble selection), got {rounds!r}")
    if not val_predictions:
        raise ValueError("ensemble selection needs at least one trial's validation predictions, got none")
    mos = np.asarray(mos, dtype=np.float64)
    library = {k: np.asarray(v, dtype=np.float64) for k, v in sorted(val_predictions.items())}
    for trial, pred in library.items():
        if pred.shape != mos.shape:
            raise ValueError(f"trial {trial}: {pred.shape[0] if pred.ndim else 0} validation predictions for "
                             f"{mos.shape[0]} validation photos; every trial must score the same photos")
        if not np.isfinite(pred).all():
            raise ValueError(f"trial {trial}: non-finite validation predictions; leave diverged trials out of the library")
    counts: dict[str, int] = {}
    best_weights: dict[str, float] = {}
    best_score = -math.inf
    for n in range(1, rounds + 1):
        chosen, chosen_score = None, -math.inf
        for trial in library:  # sorted by id: on a tie the first stays
            trial_counts = {**counts, trial: counts.get(trial, 0) + 1}
            score = _score(metric, ensemble_predictions(library, {k: c / n for k, c in trial_counts.items()}), mos)
            if chosen is None or score > chosen_score:
                chosen, chosen_score = trial, score
        counts[chosen] = counts.get(chosen, 0) + 1
        if chosen_score > best_score or not best_weights:  # the shortest of equal prefixes
            best_score, best_weights = chosen_score, {k: c / n for k, c in counts.items()}
    return dict(sorted(best_weights.items()))


# ----------------------------------------------------------------------------- the manifest of a handed-back ensemble

#: The file in an experiment folder naming the members of the ensemble a search handed back.
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "iqa-ray-ensemble"


def manifest(members: list[dict[str, Any]], **record: Any) -> dict[str, Any]:
    """An ensemble manifest: ``members`` (each ``model``: its trial folder relative to the manifest's
    folder, ``weight``, and what else the caller records) and ``record`` (how they were chosen)."""
    return {"format": ENSEMBLE_FORMAT, "version": 1, "members": members, **record}


def read_manifest(path: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """The members of the manifest at ``path``: (trial folder relative to its folder, weight).

    Raises:
        ValueError: not a manifest, no members, a member that is not a folder below the manifest's
            folder, or weights that are not positive and summing to 1 (each named).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the ensemble manifest {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != ENSEMBLE_FORMAT:
        raise ValueError(f"{path} is not an iqa-ray ensemble manifest (no \"format\": {ENSEMBLE_FORMAT!r})")
    members = data.get("members")
    if not isinstance(members, list) or not members:
        raise ValueError(f"{path}: an ensemble manifest needs a non-empty list of members")
    out = []
    for i, member in enumerate(members):
        model, weight = (member.get("model"), member.get("weight")) if isinstance(member, dict) else (None, None)
        parts = Path(str(model)).parts if isinstance(model, str) else ()
        if not parts or Path(model).is_absolute() or any(p in (".", "..") for p in parts):
            raise ValueError(f"{path}: member {i}'s model {model!r} is not a trial folder below {path.parent}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"{path}: member {i} ({model}) has weight {weight!r}; weights must be positive numbers")
        out.append((model, float(weight)))
    total = sum(w for _, w in out)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{path}: the members' weights sum to {total:.6g}, not 1")
    return out


def is_manifest(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a JSON file that says it is an ensemble manifest (a cheap check)."""
    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == ENSEMBLE_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
