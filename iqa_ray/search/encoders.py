"""SSL encoders for studies that search ``pretraining = none | ssl`` (seed 004), made before any trial.

A study whose trials may start from a quality-aware pre-trained encoder (``pretraining = "ssl"``,
fixed or one of a ``choice``) needs one encoder per backbone its space can use. The launcher calls
:func:`prepare_encoders` after the dataset is ready and before the Tuner starts, so a failure
(too few images, a bad ``[pretraining]`` value) costs seconds, not a search. Each encoder is
pre-trained once, as a Ray task with one trial's resources (a GPU share on a GPU cluster), on the
unlabelled images of the ``[pretraining]`` source (default: the training dataset's ``train``
split, so no test photo is seen even without labels), and cached by a hash of its config,
source, splits and split seed under ``$IQA_RAY_ENCODERS`` (default ``<data dir>/encoders/``): a
resumed search, or the next search with the same settings, reuses it.

The split is the trials' own: a real dataset's seeded split is drawn with the study's
``split_seed`` (the same value every trial gets), so the encoder never sees a photo the trials
hold out for validation or test. A ``[pretraining] source`` other than the training dataset is
split with that seed too (its own photos are not the trials'; when it names the training dataset
again, the seed makes it the very same split). A study that *searches* ``split_seed`` has no
single training split to pre-train on, so :func:`iqa_ray.search.study_file.load_study` rejects it when
``pretraining = "ssl"`` is possible. On a multi-node cluster that folder must be on
storage every node sees (as for pre-generated data), because trials load the encoder by path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

from iqa_ray.core.io import atomic_write_bytes, atomic_write_json, stable_hash
from iqa_ray.core.paths import default_encoders_dir


class PretrainingSource(NamedTuple):
    """Where a study's unlabelled pre-training images come from.

    Attributes:
        source: a dataset spec or folder (``[pretraining] source``, else the training dataset).
        splits: the splits of ``source`` whose photos are used (default ``("train",)``).
        pristine_only: keep only undistorted crops (``source`` is a pre-generated folder).
        split_seed: the seed of ``source``'s seeded split: the trials' ``split_seed``, so the
            ``train`` split is exactly the photos the trials train on.
    """

    source: str
    splits: tuple[str, ...]
    pristine_only: bool
    split_seed: int


def pretraining_source(study: Any) -> PretrainingSource:
    """Where a study's unlabelled pre-training images come from (see :class:`PretrainingSource`).

    ``[pretraining] source`` wins; otherwise the study's training dataset. A pre-generated folder
    contributes only its undistorted crops (pre-training degrades clean images itself). The split
    seed is always the trials' (``split_seed`` is fixed whenever ``ssl`` is possible, which
    :func:`iqa_ray.search.study_file.load_study` enforces), so pre-training on the training dataset
    sees its training photos and nothing the trials validate or test on.
    """
    from iqa_ray.training.config import TrainConfig

    table = study.pretraining
    data = TrainConfig.from_dict(_train_keys(study.constants())).data
    source = str(table.get("source") or data.dataset)
    splits = tuple(table.get("splits", ["train"]))
    pristine_only = (Path(source).expanduser() / "manifest.json").exists()
    return PretrainingSource(source, splits, pristine_only, data.split_seed)


def _train_keys(values: dict[str, Any]) -> dict[str, Any]:
    from iqa_ray.search.study import PRETRAINING

    return {k: v for k, v in values.items() if k != PRETRAINING}


def encoder_dir(config: Any, source: str, splits: tuple[str, ...], root: Path | None = None, *,
                split_seed: int) -> Path:
    """The cache folder of one encoder: ``<root>/<backbone>-<hash of config and data>``.

    Args:
        config: the encoder's :class:`~iqa_ray.ssl.config.PretrainConfig`.
        source: the dataset spec or folder of its unlabelled images.
        splits: the splits of ``source`` it saw.
        root: cache root (default: ``$IQA_RAY_ENCODERS``, else ``<data dir>/encoders``).
        split_seed: the seed of ``source``'s split. It is part of the key because another seed
            draws another ``train`` split: an encoder pre-trained on it has seen photos that
            this study's trials validate and test on, and must never be reused for them.
    """
    key = {"config": config.to_dict(), "source": source, "splits": list(splits), "split_seed": int(split_seed)}
    return (root or default_encoders_dir()) / f"{config.backbone}-{stable_hash(key)}"


def _pretrain_task(config_dict: dict[str, Any], images: list[Any], threads: int) -> tuple[bytes, dict[str, Any]]:
    """Run on a Ray worker: pre-train, return the encoder file's bytes and the run's record."""
    import ray

    from iqa_ray.ssl.config import PretrainConfig
    from iqa_ray.ssl.loop import pretrain
    from iqa_ray.trainables.placement import worker_device

    device = worker_device(threads)
    result = pretrain(PretrainConfig.from_dict(config_dict), images, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        path = result.save_encoder(Path(tmp) / "encoder.pt")
        blob = path.read_bytes()
    record = {"config": result.config.to_dict(), "initial": result.initial, "history": result.history,
              "device": str(device), "node_id": ray.get_runtime_context().get_node_id()}
    return blob, record


def prepare_encoders(
    study: Any,
    *,
    cpus: float = 1,
    gpus: float = 0,
    smoke: bool = False,
    root: Path | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, str]:
    """Pre-train (or reuse) the SSL encoder of every backbone ``study`` can pair with ``pretraining = "ssl"``.

    Needs a running Ray instance (the launcher's).

    Args:
        study: the effective study (its ``[pretraining]`` table and fixed/searched backbones).
        cpus: CPU threads of the pre-training task (the launcher passes one trial's share).
        gpus: GPU share of the task (0 on CPU clusters).
        smoke: a one-epoch, two-batch pre-training (``--smoke-test``).
        root: cache root (default: ``$IQA_RAY_ENCODERS``, else ``<data dir>/encoders``).
        progress: where to print what is happening.

    Returns:
        Backbone name -> absolute path of its ``encoder.pt`` (empty when the study never uses SSL).

    Raises:
        DatasetError: the pre-training images cannot be loaded or are too few / too small.
    """
    backbones = study.encoder_backbones()
    if not backbones:
        return {}
    import ray

    from iqa_ray.ssl.data import load_unlabelled

    source, splits, pristine_only, split_seed = pretraining_source(study)
    configs = {}
    for backbone in backbones:
        config = study.pretrain_config(backbone)
        if smoke:
            config = type(config).from_dict(config.to_dict(), epochs=1, images_per_epoch=2 * config.batch_size)
        configs[backbone] = config
    encoders: dict[str, str] = {}
    todo = {}
    for backbone, config in configs.items():
        folder = encoder_dir(config, source, splits, root, split_seed=split_seed)
        if (folder / "encoder.pt").is_file():
            progress(f"[pretraining] reusing the {backbone} encoder in {folder}")
            encoders[backbone] = str((folder / "encoder.pt").resolve())
        else:
            todo[backbone] = (config, folder)
    if not todo:
        return encoders
    # The trials' split seed: with the default seed 0 a seeded real-dataset split would be another
    # draw than the trials', and pre-training would see their validation and test photos.
    photos = load_unlabelled(source, splits=splits, pristine_only=pristine_only, split_seed=split_seed)
    progress(f"[pretraining] {len(photos)} unlabelled images from {source} (splits {list(splits)}, "
             f"split_seed {split_seed}); pre-training {len(todo)} encoder(s): {', '.join(todo)}")
    images_ref = ray.put(photos.images)
    task = ray.remote(_pretrain_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    pending = {backbone: task.remote(config.to_dict(), images_ref, int(cpus)) for backbone, (config, _) in todo.items()}
    for backbone, ref in pending.items():
        blob, record = ray.get(ref)
        _, folder = todo[backbone]
        # Write into a hidden folder and rename: a folder named like a cache entry is always complete.
        partial = folder.with_name(f".partial-{folder.name}-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        atomic_write_bytes(partial / "encoder.pt", blob)
        atomic_write_json(partial / "pretraining.json", {**record, "source": source, "splits": list(splits),
                                                         "split_seed": split_seed, "images": len(photos)})
        if folder.exists():  # another launcher finished the same encoder first: keep theirs
            shutil.rmtree(partial)
        else:
            os.replace(partial, folder)
        last = record["history"][-1] if record["history"] else {}
        progress(f"[pretraining] {backbone}: held-out ranking accuracy "
                 f"{record['initial'].get('val_ranking_accuracy', float('nan')):.3f} -> "
                 f"{last.get('val_ranking_accuracy', float('nan')):.3f} after {len(record['history'])} epochs; {folder}")
        encoders[backbone] = str((folder / "encoder.pt").resolve())
    return encoders
