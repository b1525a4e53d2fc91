"""Pre-train a backbone on unlabelled images: ``iqa-ray pretrain --source embedded --epochs 3``.

Quality-aware self-supervised pre-training (QualiCLIP-style, image only; see
:mod:`iqa_ray.ssl`): two crops of each unlabelled image are degraded at K increasing levels of one
distortion, the encoder learns to rank the levels and to agree across the two crops. Writes a run
folder::

    RUN_DIR/
        config.json         the resolved pre-training config, the data source, the git revision
                            and the command line
        metrics.jsonl       one JSON object per epoch (loss and its parts, held-out ranking
                            accuracy, images/s)
        events.out.tfevents.*   TensorBoard scalars (tensorboard --logdir RUN_DIR)
        checkpoint.pt       the latest full checkpoint (model, optimizer, epoch; --resume)
        encoder.pt          the backbone to fine-tune from (the latest epoch)

Fine-tune from it with any family, with a smaller learning rate for the pre-trained encoder
than for the new head (seed 004: 1e-5 vs 1e-4)::

    iqa-ray train --set pretrained_encoder=RUN_DIR/encoder.pt --lr 1e-4 --backbone-lr 1e-5
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from iqa_ray.cli.args import UsageError, run_folder
from iqa_ray.core.errors import DatasetError
from iqa_ray.core.io import CheckpointError, atomic_write_json, atomic_write_text, git_revision, written_with
from iqa_ray.core.options import ConfigError
from iqa_ray.models.encoder_file import ENCODER_FILE
from iqa_ray.ssl.config import PretrainConfig
from iqa_ray.ssl.data import load_unlabelled
from iqa_ray.ssl.loop import CHECKPOINT_FILE, PretrainEpoch, load_pretrain_checkpoint, pretrain

_DEFAULTS = PretrainConfig()
# (flag, config key, type, help): one flag per PretrainConfig field.
_FLAGS = [
    ("--backbone", "backbone", str, f"timm backbone to pre-train (default {_DEFAULTS.backbone})"),
    ("--pretrained", "pretrained", str,
     f"start point: offline (ImageNet Lite0 weights shipped in a pip package), none, hub or a weights file "
     f"(default {_DEFAULTS.pretrained})"),
    ("--epochs", "epochs", int, f"pre-training epochs (default {_DEFAULTS.epochs})"),
    ("--lr", "lr", float, f"backbone learning rate, AdamW with cosine decay (default {_DEFAULTS.lr})"),
    ("--head-lr-mult", "head_lr_mult", float,
     f"projection head learning rate as a multiple of --lr (default {_DEFAULTS.head_lr_mult})"),
    ("--weight-decay", "weight_decay", float, f"AdamW weight decay (default {_DEFAULTS.weight_decay})"),
    ("--levels", "levels", int, f"K, degradation levels per crop, >= 2 (default {_DEFAULTS.levels})"),
    ("--level-jitter", "level_jitter", float,
     f"random shift of each level as a fraction of half the level spacing, in [0, 1) (default {_DEFAULTS.level_jitter})"),
    ("--margin", "margin", float, f"ranking margin on the [-1, 1] quality score (default {_DEFAULTS.margin})"),
    ("--ranking-weight", "ranking_weight", float, f"weight of the ranking loss (default {_DEFAULTS.ranking_weight})"),
    ("--agreement-weight", "agreement_weight", float,
     f"weight of the two-crop agreement loss (default {_DEFAULTS.agreement_weight})"),
    ("--crop-size", "crop_size", int, f"crop side in pixels (default {_DEFAULTS.crop_size})"),
    ("--batch-size", "batch_size", int, f"images per step; each gives 2 x K crops (default {_DEFAULTS.batch_size})"),
    ("--images-per-epoch", "images_per_epoch", int,
     f"image samples per epoch, cycling the images (default {_DEFAULTS.images_per_epoch})"),
    ("--embedding-dim", "embedding_dim", int, f"width of the quality embedding (default {_DEFAULTS.embedding_dim})"),
    ("--hidden-dim", "hidden_dim", int, f"hidden width of the projection head (default {_DEFAULTS.hidden_dim})"),
    ("--holdout-images", "holdout_images", int,
     f"images held out to measure ranking accuracy (default {_DEFAULTS.holdout_images})"),
    ("--eval-samples", "eval_samples", int,
     f"fixed held-out samples scored every epoch (default {_DEFAULTS.eval_samples})"),
    ("--grad-clip", "grad_clip", float, f"clip the gradient norm to this (default {_DEFAULTS.grad_clip})"),
    ("--seed", "seed", int, f"random seed (default {_DEFAULTS.seed})"),
]
_LIST_FLAGS = [
    ("--level-range", "level_range", float, 2, f"lowest and highest level in [0, 1] (default {_DEFAULTS.level_range})"),
    ("--distortions", "distortions", str, "+", "distortion types to draw from (default: all 15 types)"),
]
assert {k for _f, k, *_ in _FLAGS + _LIST_FLAGS} == {f.name for f in fields(PretrainConfig)}, "a config field lacks a flag"


def build_parser(prog: str = "iqa-ray pretrain") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("unlabelled data")
    data.add_argument("--source", default="embedded",
                      help="embedded (photos shipped in scikit-image / scikit-learn; default), a folder of images, "
                           "or a dataset whose labels are ignored: a pre-generated folder or ADAPTER:ROOT, e.g. "
                           "koniq10k:/data/koniq")
    data.add_argument("--splits", default=None,
                      help="comma-separated splits to take photos from, e.g. train (keeps test photos unseen); "
                           "default: all images")
    data.add_argument("--pristine-only", action="store_true",
                      help="pre-generated folders: use only the undistorted crops")
    data.add_argument("--max-short-side", type=int, default=512,
                      help="downscale images so the short side is at most this (default 512, as the pre-generator)")
    data.add_argument("--split-seed", type=int, default=0, help="seed of seeded splits of real datasets (default 0)")
    cfg = p.add_argument_group("pre-training config (iqa_ray.ssl.config.PretrainConfig)")
    for flag, key, kind, text in _FLAGS:
        cfg.add_argument(flag, dest=key, type=kind, default=None, help=text)
    for flag, key, kind, nargs, text in _LIST_FLAGS:
        cfg.add_argument(flag, dest=key, type=kind, nargs=nargs, default=None, help=text)
    cfg.add_argument("--config", type=Path, help="JSON file of PretrainConfig keys (flags override it)")
    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, default=None, help="run folder (default runs/pretrain-<backbone>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def resolve_config(args: argparse.Namespace) -> PretrainConfig:
    values: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    for _flag, key, *_rest in _FLAGS + _LIST_FLAGS:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return PretrainConfig.from_dict(values)


def resumed_state(resume: Path | None, config: PretrainConfig, out: Path) -> Any:
    """The checkpoint ``--resume`` continues from (``None`` for a new run), checked before anything
    in the folder is rewritten.

    Raises:
        UsageError: the checkpoint cannot be read, or was written with a different config.
    """
    if resume is None:
        return None
    try:
        state = load_pretrain_checkpoint(resume)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    if not written_with(state, config):
        raise UsageError(f"{out} was pre-trained with a different config; --resume needs the same flags")
    return state


def main(argv: list[str] | None = None, prog: str = "iqa-ray pretrain") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    try:
        config = resolve_config(args)
    except (ConfigError, json.JSONDecodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out, resume = run_folder(args.out, f"pretrain-{config.backbone}", args.resume, CHECKPOINT_FILE)
        state = resumed_state(resume, config, out)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    splits = [s.strip() for s in args.splits.split(",")] if args.splits else None
    data = {"source": args.source, "splits": splits, "pristine_only": args.pristine_only,
            "max_short_side": args.max_short_side, "split_seed": args.split_seed}
    try:
        images = load_unlabelled(args.source, splits=splits, max_short_side=args.max_short_side,
                                 pristine_only=args.pristine_only, split_seed=args.split_seed)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(images)} unlabelled images from {args.source}", flush=True)

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"config": config.to_dict(), "data": data, "n_images": len(images),
                                            "git_revision": git_revision(),
                                            "command": "iqa-ray pretrain " + shlex.join(argv)})
    metrics_file = out / "metrics.jsonl"
    done = 0
    if resume is not None:
        # metrics.jsonl may hold an epoch after the checkpoint (a crash between the two writes):
        # rewrite it from the checkpoint's own history so each epoch appears exactly once.
        history = json.loads(state["history"])
        atomic_write_text(metrics_file, "".join(json.dumps(h) + "\n" for h in history))
        done = len(history)
    tb = SummaryWriter(str(out))
    bar = tqdm(total=config.epochs, initial=done, desc=f"pretrain/{config.backbone}", unit="epoch")

    def on_epoch(epoch: PretrainEpoch) -> None:
        with open(metrics_file, "a") as fh:
            fh.write(json.dumps(epoch.metrics) + "\n")
        for key, value in epoch.metrics.items():
            if key != "epoch":
                tb.add_scalar(f"pretrain/{key}", value, epoch.metrics["epoch"])
        tb.flush()
        epoch.save(out)  # checkpoint.pt and encoder.pt, each replaced atomically
        bar.update(1)
        m = epoch.metrics
        bar.set_postfix(loss=f"{m['train_loss']:.3f}", val_rank_acc=f"{m['val_ranking_accuracy']:.3f}",
                        img_s=f"{m['images_per_s']:.1f}")

    try:
        result = pretrain(config, images, device=args.device, resume=resume, on_epoch_end=on_epoch)
    except (DatasetError, ConfigError, CheckpointError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
        tb.close()
    last = result.history[-1] if result.history else {}
    print(f"run folder: {out}")
    print(f"held-out ranking accuracy: {result.initial['val_ranking_accuracy']:.3f} before, "
          f"{last.get('val_ranking_accuracy', float('nan')):.3f} after {config.epochs} epochs")
    print(f"encoder: {out / ENCODER_FILE}  (fine-tune: iqa-ray train "
          f"--set pretrained_encoder={(out / ENCODER_FILE).resolve()} --backbone {config.backbone} --backbone-lr 1e-5)")
    return 0

