"""Where and in which precision a run computes: process-wide device switches, the ``amp``
setting's autocast dtype, and the uint8 -> float copy of images to the device."""

from __future__ import annotations

import torch

from iqa_ray.training.config import TrainConfig


def configure_device(config: TrainConfig, device: torch.device) -> None:
    """Process-wide switches of a run on ``device`` (a trial owns its process)."""
    o = config.optim
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = o.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = o.tf32
        torch.backends.cudnn.allow_tf32 = o.tf32
    else:
        # Adam's second moments of a small head decay into denormal floats, which CPUs compute
        # an order of magnitude slower (a cached-feature epoch went from 1.2 s to 6 s); flushing
        # them to zero changes no result that matters.
        torch.set_flush_denormal(True)


def amp_mode(amp: bool | str, device: torch.device, bf16_supported: bool | None = None) -> str:
    """What a run's ``amp`` setting means on ``device``: ``"bf16"``, ``"fp16"`` or ``"off"``.

    ``"auto"`` (or ``True``) is bfloat16 on CUDA devices that support it and float16 (with a
    gradient scaler) on those that do not (V100, T4), off on CPU (CPU autocast is slow on CPUs
    without bfloat16 units); ``"bf16"`` and ``"fp16"`` force that dtype everywhere, so the CPU
    tests run the paths a GPU runs. ``bf16_supported`` overrides the device query (tests).
    """
    if amp is False or amp == "off":
        return "off"
    if amp in ("bf16", "fp16"):
        return str(amp)
    if device.type != "cuda":
        return "off"
    if bf16_supported is None:
        bf16_supported = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return "bf16" if bf16_supported else "fp16"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast_dtype(amp: bool | str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of a run's ``amp`` setting on ``device`` (:func:`amp_mode`), or ``None`` for float32."""
    return AMP_DTYPES[amp_mode(amp, device, bf16_supported)]


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    # Only the backbone runs in ``dtype``: IQAModel.forward switches autocast off for its head.
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (..., 3, H, W) on CPU -> float in [0, 1] on ``device`` (converted after the copy)."""
    return images.to(device, non_blocking=True).float().div_(255.0)

