"""The Ray tasks that follow a search's trials: the model handed back scored on test, and the baselines.

A Ray worker runs a task by importing the module that defines the task's function, so this module
imports nothing at its top: each task imports what it uses when it runs. Defined in
:mod:`iqa_ray.search.summary`, they made every worker that ran one import the whole search layer
first (Ray Tune, the console, the exports, torch and timm: about 5 s of CPU on a 2-core machine),
even for PIQE and BRISQUE, which need numpy and scipy. :mod:`iqa_ray.search.summary` starts them.
"""

from __future__ import annotations

from typing import Any


def has_test(table: Any) -> bool:
    """Whether a decoded dataset's label table has test rows."""
    return bool((table["split"] == "test").any())


def score_checkpoint(checkpoint: Any, decoded: Any, threads: int,
                     features: Any = None) -> tuple[dict[str, float], dict[str, Any]]:
    """The best-by-validation weights of a checkpoint, scored on test (empty without a test split),
    and how (:func:`~iqa_ray.search.ensemble.test_predictions`)."""
    if not has_test(decoded.table):
        return {}, {}
    from iqa_ray.core.metrics import all_metrics
    from iqa_ray.search.ensemble import test_predictions

    pred, mos, scoring = test_predictions(checkpoint, decoded, threads, features)
    return {**all_metrics(pred, mos), "n": len(mos)}, scoring


def score_probe(config: Any, decoded: Any, threads: int, features: Any = None, refit: bool = False) -> dict[str, Any]:
    """The linear probe on the frozen backbone of ``config`` (a :class:`~iqa_ray.training.config.TrainConfig`),
    scored on the test split; fitted on the search's feature cache where it holds the probe's
    features (:func:`~iqa_ray.training.features.probe_features`), else on features it computes."""
    from iqa_ray.evaluation.baselines import probe_baseline
    from iqa_ray.trainables.placement import worker_device
    from iqa_ray.training.features import probe_features

    m = config.model
    return probe_baseline(decoded, backbone=m.backbone, pretrained=str(m.pretrained),
                          img_size=m.img_size or config.data.crop_size, device=worker_device(threads),
                          features=probe_features(features, config), refit=refit)


def score_classical(decoded: Any, names: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    """Each of the classical baselines ``names`` (PIQE, BRISQUE) scored on the test photos, one after the other."""
    from iqa_ray.evaluation.baselines import classical_baseline

    return tuple(classical_baseline(decoded, name) for name in names)
