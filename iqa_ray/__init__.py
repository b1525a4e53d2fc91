"""iqa-ray: no-reference image quality models found by distributed hyperparameter search on Ray.

``iqa_ray.load_model(MODEL)`` returns a scorer of a trained model (an experiment folder, a trial
folder, a run folder or a checkpoint); call it on paths, PIL images, arrays or tensors.
"""

from typing import Any


def load_model(model: Any, device: Any = None) -> Any:
    """The :class:`~iqa_ray.evaluation.scoring.IQAScorer` of ``model`` (see :func:`iqa_ray.evaluation.scoring.load_model`)."""
    from iqa_ray.evaluation.scoring import load_model as _load  # torch and the engine load on first use

    return _load(model, device)


__all__ = ["load_model"]
