"""Train one configuration without Ray: ``iqa-ray train --family hyperiqa --epochs 3``.

Writes a run folder::

    RUN_DIR/
        config.json         the resolved config, the git revision and the command line
        metrics.jsonl       one JSON object per epoch (train loss, val SRCC/PLCC/KRCC/RMSE, LRs, images/s)
        events.out.tfevents.*   TensorBoard scalars (tensorboard --logdir RUN_DIR)
        checkpoint.pt       the latest full checkpoint (resume with --resume RUN_DIR)
        best.pt             weights of the best epoch by validation SRCC
        result.json         best epoch, its validation metrics and the test metrics of that model

and prints the final validation and test SRCC/PLCC. Every config key can be set with
``--set key=value`` (repeatable) or a JSON/YAML-free ``--config file.json`` of flat keys; the
common ones have their own flags. ``--eval-on DATASET`` also scores the selected model on other
datasets (the cross-dataset table of seeds 002/004).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from iqa_ray.cli.args import UsageError, run_folder
from iqa_ray.core.deprecations import CONFIG, old_flags
from iqa_ray.core.errors import DatasetError
from iqa_ray.core.io import CheckpointError, atomic_write_json, atomic_write_text, git_revision, save_checkpoint
from iqa_ray.core.options import ConfigError
from iqa_ray.training.checkpoints import CHECKPOINT_FILE, load_checkpoint
from iqa_ray.training.config import TrainConfig, valid_keys
from iqa_ray.training.engine import EpochResult, fit

# Flags with their own option: (flag, config key, type, help).
_COMMON = [
    ("--family", "family", str, "model family: mlp, gmm, hyperiqa"),
    ("--backbone", "backbone", str, "timm backbone, e.g. efficientnet_lite0, resnet18, swin_tiny_patch4_window7_224"),
    ("--pretrained", "pretrained", str, "backbone weights: offline (default), none, hub, or a weights file"),
    ("--dataset", "dataset", str, "embedded (default), a pre-generated folder, or ADAPTER:ROOT, e.g. koniq10k:/data/koniq"),
    ("--label", "label", str, "label of pre-generated data: severity (default) or ssim"),
    ("--epochs", "epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "training batch size"),
    ("--crop-size", "crop_size", int, "crop side in pixels"),
    ("--lr", "lr", float, "head learning rate"),
    ("--backbone-lr", "backbone_lr", float, "backbone learning rate (default: lr * backbone_lr_mult)"),
    ("--optimizer", "optimizer", str, "adam, adamw, sgd"),
    (("--lr-schedule", *old_flags(CONFIG, "lr_schedule")), "lr_schedule", str, "learning-rate schedule: cosine, step, plateau, none "
     "(--scheduler is its old name)"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up epochs"),
    ("--loss", "loss", str, "l1, mse, ranking"),
    ("--alpha", "alpha", float, "ranking loss weight (loss=ranking)"),
    ("--margin", "margin", float, "ranking loss margin on the 0-100 scale"),
    ("--n-clusters", "n_clusters", int, "GMM clusters (family gmm)"),
    ("--patience", "early_stopping_patience", int, "early stopping patience on validation SRCC"),
    ("--seed", "seed", int, "random seed"),
    ("--num-workers", "num_workers", int, "DataLoader workers (default: 0 on CPU; on a GPU, CPU threads - 1, 1 to 8)"),
]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser(prog: str = "iqa-ray train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, key, kind, text in _COMMON:
        p.add_argument(*(flag if isinstance(flag, tuple) else (flag,)), dest=key, type=kind, default=None, help=text)
    p.add_argument("--frozen-backbone", dest="frozen_backbone", action="store_const", const=True, default=None,
                   help="freeze the backbone (seed 001's resnet18_frozen)")
    p.add_argument("--multiscale", dest="multiscale", action="store_const", const=True, default=None,
                   help="HyperIQA multi-scale feature fusion")
    p.add_argument("--config", type=Path, help="JSON file of flat config keys (flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any config key (repeatable); values are JSON or plain strings. Keys: {', '.join(valid_keys())}")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<family>-<backbone>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--eval-on", action="append", default=[], metavar="DATASET",
                   help="also score the selected model on this dataset (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        values.update(json.loads(args.config.read_text()))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        values[key.strip()] = _parse_value(text)
    for _flag, key, _kind, _text in _COMMON:
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    for key in ("frozen_backbone", "multiscale"):
        if getattr(args, key) is not None:
            values[key] = True
    return TrainConfig.from_dict(values)


class RunWriter:
    """Writes a standalone run's folder: metrics, TensorBoard scalars, checkpoints."""

    def __init__(self, out: Path, config: TrainConfig, argv: list[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", {"config": config.to_dict(), "git_revision": git_revision(),
                                                "command": "iqa-ray train " + shlex.join(argv)})
        self.metrics_file = out / "metrics.jsonl"
        self.tb = SummaryWriter(str(out))

    def __call__(self, epoch: EpochResult) -> None:
        with open(self.metrics_file, "a") as fh:
            fh.write(json.dumps(epoch.metrics) + "\n")
        for key, value in epoch.metrics.items():
            if key != "epoch":
                self.tb.add_scalar(key, value, epoch.metrics["epoch"])
        self.tb.flush()
        if not (epoch.checkpoint_due or epoch.is_best):  # checkpoint_every; best.pt below needs this epoch's
            return
        epoch.save(self.out)  # checkpoint.pt, atomically replaced
        if epoch.is_best:
            state = load_checkpoint(self.out)
            save_checkpoint(self.out / "best.pt", {**state, "optimizer": {}, "best_model": None})

    def close(self) -> None:
        self.tb.close()


def main(argv: list[str] | None = None, prog: str = "iqa-ray train") -> int:
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
        out, resume = run_folder(args.out, f"{config.model.family}-{config.model.backbone}", args.resume,
                                 CHECKPOINT_FILE)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    writer = RunWriter(out, config, argv)
    done = 0
    if resume is not None:
        # metrics.jsonl may hold epochs after the checkpoint (a crash between the two writes):
        # rewrite it from the checkpoint's own history so each epoch appears exactly once.
        history = json.loads(load_checkpoint(resume)["history"])
        atomic_write_text(writer.metrics_file, "".join(json.dumps(h) + "\n" for h in history))
        done = len(history)
    bar = tqdm(total=config.optim.epochs, initial=done, desc=f"{config.model.family}/{config.model.backbone}",
               unit="epoch")

    def on_epoch(epoch: EpochResult) -> None:
        writer(epoch)
        bar.update(1)
        m = epoch.metrics
        bar.set_postfix(loss=f"{m['train_loss']:.3f}", val_srcc=f"{m['val_srcc']:.3f}", best=f"{m['best_val_srcc']:.3f}")

    try:
        result = fit(config, device=args.device, resume=resume, on_epoch_end=on_epoch)
    except (DatasetError, ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
        writer.close()

    extra = {}
    for spec in args.eval_on:
        extra[spec] = evaluate_on(result.model, config, spec, args.device)
    summary = {"best_epoch": result.best_epoch, "val": result.best_val, "test": result.test,
               "stopped_early": result.stopped_early, "eval_on": extra}
    atomic_write_json(out / "result.json", summary)
    print(f"run folder: {out}")
    print(f"best epoch {result.best_epoch}: val SRCC {result.best_val['srcc']:.4f} PLCC {result.best_val['plcc']:.4f}")
    if result.test is not None:
        print(f"test (selected model): SRCC {result.test['srcc']:.4f} PLCC {result.test['plcc']:.4f}")
    for spec, metrics in extra.items():
        print(f"{spec}: SRCC {metrics['srcc']:.4f} PLCC {metrics['plcc']:.4f} (n={metrics['n']})")
    print(f"TensorBoard: tensorboard --logdir {out} --host 127.0.0.1")
    return 0


def evaluate_on(model: torch.nn.Module, config: TrainConfig, spec: str, device: str | None) -> dict[str, float]:
    """Score ``model`` on every image of another dataset (all its splits: it was never trained on)."""
    from iqa_ray.core.runtime import default_device
    from iqa_ray.training.inference import evaluate_dataset

    return evaluate_dataset(model, config, spec, device=torch.device(device) if device else default_device())

