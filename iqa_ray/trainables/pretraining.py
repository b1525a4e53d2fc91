"""Function trainable for quality-aware pre-training (:func:`iqa_ray.ssl.loop.pretrain`) under Ray Tune.

The unlabelled images reach trials through
``tune.with_parameters(pretrain_trainable, images=load_unlabelled(...).images)`` (put in the
object store once). Every epoch is reported with a checkpoint folder holding ``checkpoint.pt``
(resumable) and ``encoder.pt`` (what fine-tuning starts from: ``pretrained_encoder``), so the best
trial's encoder is ``result.checkpoint.path / "encoder.pt"``. Searchable keys are the
:class:`~iqa_ray.ssl.config.PretrainConfig` fields (``epochs``, ``levels``, ``lr``, ``margin``, ...).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from iqa_ray.ssl.config import PretrainConfig
from iqa_ray.ssl.loop import PretrainEpoch, load_pretrain_checkpoint, pretrain
from iqa_ray.trainables.placement import worker_device


def pretrain_trainable(config: Mapping[str, Any], *, images: Sequence[np.ndarray], cpus_per_trial: float = 1) -> None:
    """Pre-train one trial and report every epoch to Tune.

    Args:
        config: the trial's flat :class:`~iqa_ray.ssl.config.PretrainConfig` keys.
        images: the unlabelled RGB uint8 images, shared through the object store.
        cpus_per_trial: CPU threads this trial may use.
    """
    from ray import tune

    device = worker_device(cpus_per_trial)
    pretrain_config = PretrainConfig.from_dict(dict(config))
    checkpoint = tune.get_checkpoint()
    resume_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume_state = load_pretrain_checkpoint(directory)
    node = {"pid": os.getpid(), "resumed_from_epoch": int(resume_state["epoch"]) + 1 if resume_state is not None else 0}

    def report(epoch: PretrainEpoch) -> None:
        with tempfile.TemporaryDirectory() as directory:
            epoch.save(directory)
            tune.report({**epoch.metrics, **node}, checkpoint=tune.Checkpoint.from_directory(directory))

    pretrain(pretrain_config, images, device=device, resume=resume_state, on_epoch_end=report)
