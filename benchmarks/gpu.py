#!/usr/bin/env python
"""The GPU path in one command: training speed per precision, bf16 vs fp32 scores, data delivery
with workers, trials per hour at fractional GPUs, peak memory, and a 2-GPU data-parallel trial.

On a CUDA machine (full size, under 8 minutes on one GPU):

* ``train``: training images/s of HyperIQA (multi-scale) on ResNet-50 and Swin-T at 224 px,
  batch 96, in fp32, bf16 and fp16 (fp16 with the engine's gradient scaler), through the engine's
  own pieces (``build``, ``build_optimizer``, ``configure_device``: channels_last, cudnn.benchmark,
  TF32, fused AdamW), and the peak GPU memory of each;
* ``scores``: the same trained-for-a-few-steps model scoring the same images in bf16 and fp32
  (the engine runs only the backbone in bf16, the head in fp32): largest and median difference
  against the spread of the scores, and the rank correlation of the two;
* ``delivery``: images/s the engine's training DataLoader delivers (224 px crops of 512x384
  images, random crop + flip, batching, pinning on CUDA) with 0, 2 and 4 workers, against what
  the ResNet-50 step consumes, so the table says how many CPUs per trial keep a GPU fed;
* ``fractional``: ``benchmarks/fractional_gpu.py`` (the real launcher at 1, 0.5 and 0.25 GPU per
  trial: trials per hour and peak GPU memory per trial), small settings;
* ``ddp``: with two GPUs or more, one trial data-parallel on 2 GPUs (``--gpus-per-trial 2``).

On a machine without CUDA the same checks run at small size on CPU (ResNet-50 at 64 px, Swin-T
at 224 px with tiny batches, a few steps; CPU autocast for bf16 and fp16), the delivery figures
are measured as they are (they are CPU work either way), and the table says which parts need a
GPU. Weights are random (``pretrained = "none"``): speed does not depend on them, and nothing is
downloaded.

    python benchmarks/gpu.py [--parts train scores delivery fractional ddp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from iqa_ray.training.build import build, memory_format
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.device import configure_device
from iqa_ray.training.loaders import make_loaders
from iqa_ray.training.schedule import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import synthetic_decoded  # noqa: E402

HERE = Path(__file__).resolve().parent
BACKBONES = ("resnet50", "swin_tiny_patch4_window7_224")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sizes(cuda: bool) -> dict[str, Any]:
    """Full size on a GPU; on CPU the same checks small enough to take a minute or two."""
    if cuda:
        return {"resnet50": {"crop": 224, "batch": 96}, "swin_tiny_patch4_window7_224": {"crop": 224, "batch": 96},
                "warmup": 3, "steps": 10, "score_images": 384, "delivery_batch": 96, "delivery_images": 480}
    return {"resnet50": {"crop": 64, "batch": 8}, "swin_tiny_patch4_window7_224": {"crop": 224, "batch": 2},
            "warmup": 1, "steps": 2, "score_images": 32, "delivery_batch": 32, "delivery_images": 320}


def config_for(backbone: str, crop: int, batch: int, **extra: Any) -> TrainConfig:
    return TrainConfig.from_dict({"family": "hyperiqa", "backbone": backbone, "pretrained": "none", "multiscale": True,
                                  "crop_size": crop, "batch_size": batch, "optimizer": "adamw", "lr": 1e-4,
                                  **extra})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """The engine's training step on one fixed uint8 batch already on the device."""

    def __init__(self, backbone: str, crop: int, batch: int, precision: str, device: torch.device):
        self.config = config_for(backbone, crop, batch)
        configure_device(self.config, device)
        torch.manual_seed(0)
        self.device, self.dtype = device, DTYPES[precision]
        self.model = build(self.config, device)
        self.format = memory_format(self.config, device)
        self.optimizer = build_optimizer(self.config, self.model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=generator).to(device)
        self.target = (torch.rand(batch, generator=generator) * 100).to(device)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        return x.contiguous(memory_format=self.format) if self.format is not None else x

    def __call__(self) -> None:
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.model(self.inputs(self.images))
        loss = self.model.compute_loss(out, self.target)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @torch.no_grad()
    def scores(self, images: torch.Tensor, dtype: torch.dtype | None, chunk: int) -> np.ndarray:
        self.model.eval()
        parts = []
        for start in range(0, len(images), chunk):
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                parts.append(self.model(self.inputs(images[start:start + chunk].to(self.device)))["score"].float())
        return torch.cat(parts).cpu().numpy().astype(np.float64)


def measure_train(backbone: str, precision: str, s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    crop, batch = s[backbone]["crop"], s[backbone]["batch"]
    row: dict[str, Any] = {"backbone": backbone, "precision": precision, "crop": crop, "batch": batch}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = Step(backbone, crop, batch, precision, device)
        for _ in range(s["warmup"]):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(s["steps"]):
            step()
        sync(device)
        seconds = time.perf_counter() - start
    except (RuntimeError, NotImplementedError) as exc:  # an unsupported dtype/kernel on this device: recorded
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    row["train_images_per_s"] = round(batch * s["steps"] / seconds, 1)
    if device.type == "cuda":
        row["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    del step
    return row


def measure_scores(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """bf16 vs fp32 scores of one ResNet-50 HyperIQA after a few fp32 training steps."""
    crop = s["resnet50"]["crop"]
    step = Step("resnet50", crop, s["resnet50"]["batch"], "fp32", device)
    for _ in range(s["warmup"] + s["steps"]):
        step()
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (s["score_images"], 3, crop, crop), dtype=torch.uint8, generator=generator)
    # Smooth images of varying brightness, so scores spread as they do over real photos.
    images = torch.nn.functional.avg_pool2d(images.float(), 5, 1, 2).mul(
        torch.linspace(0.2, 1.0, len(images)).view(-1, 1, 1, 1)).clamp(0, 255).to(torch.uint8)
    fp32 = step.scores(images, None, chunk=64)
    bf16 = step.scores(images, torch.bfloat16, chunk=64)
    diff = np.abs(bf16 - fp32)
    return {"images": len(images), "crop": crop, "fp32_score_std": round(float(fp32.std()), 4),
            "max_abs_diff": round(float(diff.max()), 4), "median_abs_diff": round(float(np.median(diff)), 4),
            "max_diff_over_std": round(float(diff.max() / max(fp32.std(), 1e-12)), 4),
            "srcc_bf16_vs_fp32": round(float(spearmanr(bf16, fp32)[0]), 5), "dtype": str(bf16.dtype)}


def measure_delivery(s: dict[str, Any], device: torch.device, workers: int, epochs: int = 3) -> dict[str, Any]:
    """Images/s of the engine's training loader: 224 px crops of 512x384 images."""
    decoded = synthetic_decoded(n_train=s["delivery_images"], n_val=8, width=512, height=384, seed=3)
    config = TrainConfig.from_dict({"family": "mlp", "backbone": "efficientnet_lite0", "pretrained": "none",
                                    "crop_size": 224, "batch_size": s["delivery_batch"], "num_workers": workers})
    loaders = make_loaders(config, decoded, with_test=False, device=device)
    count = 0
    for batch in loaders.train:  # the first epoch starts the workers: not timed
        count += len(batch["image"])
    start = time.perf_counter()
    count = 0
    for _ in range(epochs):
        for batch in loaders.train:
            images = batch["image"].to(device, non_blocking=True)
            count += len(images)
    sync(device)
    seconds = time.perf_counter() - start
    del loaders
    return {"workers": workers, "crop": 224, "source": "512x384", "batch": s["delivery_batch"],
            "pinned": device.type == "cuda", "images_per_s": round(count / seconds, 1)}


def run_fractional(out_json: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "fractional_gpu.py"), "--num-samples", "4", "--max-epochs", "2",
           "--json", str(out_json)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "rc": proc.returncode,
                              "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode == 0 and out_json.exists():
        result.update(json.loads(out_json.read_text()))
    else:
        result["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return result


def run_ddp(storage: Path) -> dict[str, Any]:
    """One trial data-parallel on 2 GPUs through the real launcher."""
    cmd = [sys.executable, "launch/tune_ranking.py", "--gpus", "2", "--gpus-per-trial", "2", "--num-samples", "1",
           "--max-epochs", "2", "--trial-scheduler", "none", "--searcher", "random", "--storage", str(storage),
           "--name", "ddp2", "--recipe", "none"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "rc": proc.returncode,
                              "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["train", "scores", "delivery", "fractional", "ddp"],
                   choices=["train", "scores", "delivery", "fractional", "ddp"])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    p.add_argument("--json", help="write the results here (default: benchmarks/results/gpu_<cuda|cpu>.json)")
    args = p.parse_args(argv)
    # 4 workers on a 2-CPU machine is the measurement, not a mistake
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    s = sizes(cuda)
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": torch.cuda.device_count(),
            "mode": "full" if cuda else "small (no CUDA: CPU at small size)", "threads": torch.get_num_threads(),
            "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported())}
    print(json.dumps(info), flush=True)
    results: dict[str, Any] = {"info": info, "sizes": s}
    table: list[tuple[str, str, str]] = []
    begin = time.perf_counter()

    if "train" in args.parts:
        results["train"] = []
        for backbone in BACKBONES:
            for precision in PRECISIONS:
                row = measure_train(backbone, precision, s, device)
                results["train"].append(row)
                print(row, flush=True)
                setting = f"{backbone} {row['crop']} px, batch {row['batch']}, {precision}"
                if "error" in row:
                    table.append(("train img/s", setting, f"failed: {row['error']}"))
                else:
                    mem = f", peak {row['peak_gpu_mem_mb']} MiB" if "peak_gpu_mem_mb" in row else ""
                    table.append(("train img/s", setting, f"{row['train_images_per_s']}{mem}"))
    if "scores" in args.parts:
        row = measure_scores(s, device)
        results["scores"] = row
        print(row, flush=True)
        table.append(("bf16 vs fp32 scores", f"resnet50 {row['crop']} px, {row['images']} images",
                      f"max |diff| {row['max_abs_diff']} ({row['max_diff_over_std']:.1%} of the score std), "
                      f"SRCC {row['srcc_bf16_vs_fp32']}"))
    if "delivery" in args.parts:
        results["delivery"] = []
        for workers in args.workers:
            row = measure_delivery(s, device, workers)
            results["delivery"].append(row)
            print(row, flush=True)
            table.append(("data delivery img/s", f"224 px crops of 512x384, {workers} workers, batch {row['batch']}",
                          f"{row['images_per_s']}"))
    with tempfile.TemporaryDirectory() as tmp:
        if "fractional" in args.parts:
            if cuda:
                results["fractional"] = run_fractional(Path(tmp) / "fractional.json")
                for r in results["fractional"].get("packing", []):
                    table.append(("trials/hour", f"{r['gpus_per_trial']} GPU per trial",
                                  f"{r['trials_per_hour']} (peak {r['peak_gpu_mem_mb_per_trial']} MiB per trial)"))
                if results["fractional"]["rc"] != 0:
                    table.append(("trials/hour", "1, 0.5, 0.25 GPU per trial", "failed: see JSON"))
            else:
                results["fractional"] = {"skipped": "needs a CUDA GPU"}
                table.append(("trials/hour, peak memory", "1, 0.5, 0.25 GPU per trial", "needs a CUDA GPU"))
        if "ddp" in args.parts:
            if torch.cuda.device_count() >= 2:
                results["ddp"] = run_ddp(Path(tmp) / "ddp")
                table.append(("data-parallel trial", "2 GPUs", "ok" if results["ddp"]["rc"] == 0 else "failed: see JSON"))
            else:
                why = "needs 2 CUDA GPUs (CPU data-parallel: benchmarks/ddp_cpu.py)"
                results["ddp"] = {"skipped": why}
                table.append(("data-parallel trial", "2 GPUs", why))
    results["seconds"] = round(time.perf_counter() - begin, 1)

    print(f"\n{info['device']}, {info['mode']}, torch {info['torch']}, {results['seconds']} s\n")
    print("| check | setting | result |\n|---|---|---|")
    for check, setting, result in table:
        print(f"| {check} | {setting} | {result} |")
    if not cuda:
        print("\nNeeds a GPU: fp16/bf16 speed-ups (CPU autocast only checks the path), peak GPU memory, "
              "trials per hour at fractional GPUs, the 2-GPU data-parallel trial.")
    out = Path(args.json) if args.json else HERE / "results" / f"gpu_{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(results, indent=2))
    tmp_out.replace(out)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
