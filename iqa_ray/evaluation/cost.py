"""What a model costs to run: parameters, FLOPs and latency per image at its evaluation size.

IQA models end up in cameras and upload pipelines, where a 5 ms model that is 0.01 SRCC worse can
beat a 200 ms one; these are the numbers to weigh against SRCC.

* ``params``: every parameter of the model (backbone and head), in millions as ``params_m``.
* ``gflops``: PyTorch's own count (``torch.utils.flop_counter.FlopCounterMode``) of one forward pass
  over one image's evaluation input (all its patches), in GFLOPs (a multiply-add is 2 FLOPs).
* ``latency_ms``: wall time per image on ``device``, at batch 1 and at the evaluation batch size:
  warm-up passes first, then the median of several timed passes (CUDA synchronised around each).
  On CPU the batched timing uses at most ``CPU_BATCH_PIXELS`` input pixels per pass (the timed
  batch size is recorded): per-image time on CPU stops changing long before the evaluation batch,
  and timing 64 images of 4 patches four times cost a CPU trial 26 s before it trained anything.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from iqa_ray.core.selection import COST_OBJECTIVES

#: The cost keys a trial reports, with the direction that is better.
COST_METRICS = {name: "min" for name in COST_OBJECTIVES}

#: Input pixels (patches x H x W) per batched timing pass on CPU: 16 patches of 128 x 128.
CPU_BATCH_PIXELS = 16 * 128 * 128


@dataclass(frozen=True)
class ModelCost:
    params_m: float  # parameters, millions
    gflops: float  # per image (all its evaluation patches), GFLOPs
    latency_ms: float  # per image at batch 1, median, milliseconds
    latency_batch_ms: float  # per image at the evaluation batch size, median, milliseconds
    batch_size: int  # the batch size timed (the evaluation batch size, capped on CPU)
    input_shape: tuple[int, ...]  # one image's evaluation input: (patches, 3, H, W)
    device: str

    def metrics(self) -> dict[str, float]:
        """The numeric cost keys (``COST_METRICS``) for a trial's report."""
        return {k: float(getattr(self, k)) for k in COST_METRICS}

    def report(self) -> dict[str, float | int]:
        """What a trial reports with every epoch: :meth:`metrics` and ``latency_batch_size``, the
        batch the per-image batched latency was timed at."""
        return {**self.metrics(), "latency_batch_size": int(self.batch_size)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of ``model(example)`` by PyTorch's flop counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(example)
    return int(counter.get_total_flops())


@torch.no_grad()
def time_forward(model: nn.Module, example: torch.Tensor, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of ``model(example)`` over ``repeats`` passes after ``warmup`` untimed ones."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {warmup} and {repeats}")
    sync = torch.cuda.synchronize if example.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(example)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(example)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_cost(model: nn.Module, image_input: torch.Tensor, *, batch_size: int = 16, warmup: int = 2,
                 repeats: int = 5, max_batch_pixels: int | None = None) -> ModelCost:
    """The cost of scoring one image whose evaluation input is ``image_input`` (``(patches, 3, H, W)``,
    on the device to measure; a model scores an image by averaging its patches' scores).

    Args:
        model: the model, in eval mode (it is put in eval mode and left there).
        image_input: one image's evaluation patches, on the model's device.
        batch_size: the evaluation batch size (images), timed besides batch 1.
        warmup, repeats: untimed and timed passes of each timing.
        max_batch_pixels: if given, the batched timing uses at most this many input pixels per pass
            (but at least one image); the batch size actually timed is ``ModelCost.batch_size``.
    """
    if image_input.dim() != 4 or image_input.shape[1] != 3:
        raise ValueError(f"image_input must be (patches, 3, H, W), got {tuple(image_input.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_pixels is not None and max_batch_pixels < 1:
        raise ValueError(f"max_batch_pixels must be >= 1 or None, got {max_batch_pixels}")
    model.eval()
    patches = image_input.shape[0]
    if max_batch_pixels is not None:
        pixels_per_image = patches * image_input.shape[2] * image_input.shape[3]
        batch_size = max(1, min(batch_size, max_batch_pixels // pixels_per_image))
    flops = count_flops(model, image_input)
    one = time_forward(model, image_input, warmup=warmup, repeats=repeats)
    if batch_size > 1:
        batch = image_input.repeat(batch_size, 1, 1, 1)
        per_image_batched = time_forward(model, batch, warmup=max(1, warmup // 2), repeats=max(1, repeats // 2 + 1)) / batch_size
    else:
        per_image_batched = one
    return ModelCost(params_m=count_params(model) / 1e6, gflops=flops / 1e9, latency_ms=one * 1e3,
                     latency_batch_ms=per_image_batched * 1e3, batch_size=int(batch_size),
                     input_shape=(patches, *image_input.shape[1:]), device=str(image_input.device))


def model_cost(config: Any, decoded: Any, device: torch.device | str, *, warmup: int = 2, repeats: int = 5) -> ModelCost:
    """The cost of ``config``'s model on ``device`` at its evaluation size: the evaluation input of the
    first validation image (the whole image at its decoded size, or its ``eval_patches`` patches),
    timed at batch 1 and at ``eval_batch_size`` (on CPU at most ``CPU_BATCH_PIXELS`` pixels per
    pass). The model is built afresh (its weights do not change
    its cost), so a trial measures it before training, whatever scheduler stops it later."""
    from iqa_ray.training.build import build
    from iqa_ray.training.device import to_float
    from iqa_ray.training.loaders import eval_dataset

    device = torch.device(device)
    split = "val" if (decoded.table["split"] == "val").any() else "train"
    image_input = to_float(eval_dataset(config, decoded, split)[0]["image"], device)
    model = build(config, device)
    cap = CPU_BATCH_PIXELS if device.type == "cpu" else None
    return measure_cost(model, image_input, batch_size=config.data.eval_batch_size, warmup=warmup, repeats=repeats,
                        max_batch_pixels=cap)
