"""One function trainable for every model family (the family is a config key).

Data reaches trials through ``tune.with_parameters(iqa_trainable, decoded=...)``: the decoded
dataset is put in Ray's object store once, as one contiguous array, and every trial on a node
maps the same buffer instead of decoding the images again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from iqa_ray.core.io import git_revision
from iqa_ray.data.decoded import DecodedImages
from iqa_ray.trainables.placement import device_report, worker_device
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import EpochResult, NonFiniteLossError, fit

NONFINITE_MARKER = "nonfinite_loss.json"


def with_split(decoded: DecodedImages, split_seed: int, splits: Mapping[int, Any] | None) -> DecodedImages:
    """``decoded`` with the split of ``split_seed`` (the same images, another ``split`` column).

    Without ``splits`` the decoded dataset is used as it is (search trials: ``split_seed`` is never
    searched, so it is the one the dataset was decoded with).
    """
    if not splits:
        return decoded
    if split_seed not in splits:
        raise ValueError(f"split_seed {split_seed} asked for, but only the splits of seeds {sorted(splits)} were "
                         "prepared for this search")
    table = decoded.table.copy()
    table["split"] = list(splits[split_seed])
    return DecodedImages(images=decoded.images, table=table, skipped=decoded.skipped)


def nonfinite_marker(trial_dir: Path) -> Path:
    """The file a trial leaves when its loss turned non-finite; raises if an earlier attempt left it.

    A retry after a non-finite loss would fail the same way (runs are seeded): it fails at once.
    """
    marker = trial_dir / NONFINITE_MARKER
    if marker.exists():
        raise NonFiniteLossError(json.loads(marker.read_text())["message"])
    return marker


def process_report(resume_state: Any, **extra: Any) -> dict[str, Any]:
    """Where and from what this process runs, reported with every epoch: a restarted trial reports a
    new pid and the epoch it resumed from, so "nothing before the checkpoint was trained twice" can
    be checked (``extra``: more of the same, e.g. a data-parallel trial's worker count)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": os.uname().nodename, "pid": os.getpid(),
            "git_revision": git_revision(), **extra,
            "resumed_from_epoch": int(resume_state["epoch"]) + 1 if resume_state is not None else 0}


# model and evaluation input -> its cost, measured once per worker process (trial_cost)
_COSTS: dict[tuple[str, str, str, int], dict[str, float]] = {}


def trial_cost(config: TrainConfig, decoded: DecodedImages, device: Any) -> dict[str, float]:
    """:func:`~iqa_ray.evaluation.cost.model_cost` of ``config`` on ``device``, as reported: measured
    once per worker process for each model and evaluation input (the config's model and data
    sections, the device and torch's thread count), so a reused actor (search/tuner.py) starts the
    next trial of the same model at once instead of timing it again (about 2.6 s for the cpu
    recipe's model on one thread, longer than a trial's epoch on cached features)."""
    import torch

    from iqa_ray.evaluation.cost import model_cost

    key = (json.dumps(config.model.to_dict(), sort_keys=True, default=str),
           json.dumps(config.data.to_dict(), sort_keys=True, default=str), str(device), torch.get_num_threads())
    if key not in _COSTS:
        _COSTS[key] = model_cost(config, decoded, device).report()
    return dict(_COSTS[key])


def iqa_trainable(
    config: Mapping[str, Any],
    *,
    decoded: DecodedImages,
    resolve: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
    cpus_per_trial: float = 1,
    features: Any = None,
    splits: Mapping[int, Any] | None = None,
    score_test: bool = False,
    stop_epochs: Sequence[int] = (),
) -> None:
    """Train one trial and report every epoch to Tune.

    Args:
        config: the trial's config from the search space (flat config keys, possibly with
            search-only keys that ``resolve`` maps to config keys).
        decoded: the decoded dataset, shared through the object store.
        resolve: maps a trial config to flat :class:`~iqa_ray.training.config.TrainConfig` keys (a study's
            derived parameters, e.g. a learning rate drawn inside its backbone's range).
        cpus_per_trial: CPU threads this trial may use.
        features: the dataset's :class:`~iqa_ray.training.features.FeatureCache` (``feature_cache`` runs),
            shared through the object store like ``decoded``.
        splits: split seed -> the split name of every row of ``decoded``, for trials that train on
            another random split of the same images (``--splits``); a trial whose ``split_seed`` is
            neither the decoded one nor in here is an error, never a silent use of the wrong split.
        score_test: score the kept weights on the test split at the end (the ``--splits`` runs,
            each a final model of its own split); search trials report validation only.
        stop_epochs: epochs (from 1) where the search's scheduler may stop the trial
            (:func:`iqa_ray.search.tuner.stop_epochs`): reported with a checkpoint whatever the
            run's ``checkpoint_every``, so a stopped trial keeps its weights.
    """
    from ray import tune

    device = worker_device(cpus_per_trial)
    flat = resolve(config) if resolve is not None else dict(config)
    train_config = TrainConfig.from_dict(flat)
    decoded = with_split(decoded, train_config.data.split_seed, splits)
    context = tune.get_context()
    marker = nonfinite_marker(Path(context.get_trial_dir()))
    checkpoint = tune.get_checkpoint()
    resume_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            from iqa_ray.training.checkpoints import load_checkpoint

            resume_state = load_checkpoint(directory)
    # The device beside the GPU share Ray gave this trial: a share without CUDA trains on the CPU,
    # and the search says so once (search/console.py).
    node = process_report(resume_state, **device_report(device))
    # What the model costs at its evaluation size (parameters, FLOPs, ms per image on this trial's
    # device): reported with every epoch, so it reaches trials.parquet and HParams for every trial.
    node.update(trial_cost(train_config, decoded, device))
    must_checkpoint = set(stop_epochs)

    def report(epoch: EpochResult) -> None:
        if not (epoch.checkpoint_due or epoch.epoch + 1 in must_checkpoint):
            tune.report({**epoch.metrics, **node})
            return
        with tempfile.TemporaryDirectory() as directory:
            epoch.save(directory)
            tune.report({**epoch.metrics, **node}, checkpoint=tune.Checkpoint.from_directory(directory))

    try:
        # Trials report validation only; the search scores the trial it selects on test, once.
        fit(train_config, decoded, device=device, resume=resume_state, on_epoch_end=report, score_test=score_test,
            features=features, cpus=max(1, int(cpus_per_trial)))
    except NonFiniteLossError as exc:
        message = f"trial {context.get_trial_name()}: {exc}"
        marker.write_text(json.dumps({"message": message}))
        raise NonFiniteLossError(message) from None
