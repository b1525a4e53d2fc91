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


#: CPU flags (Linux ``/proc/cpuinfo``) of instructions that compute bfloat16 natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), from the flags in
    ``cpuinfo`` (default: ``/proc/cpuinfo``). ``False`` where they cannot be read (not Linux): on
    such CPUs bf16 autocast is emulated and several times slower than float32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def feature_autocast_dtype(feature_dtype: str, device: torch.device, bf16_native: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of the frozen-feature pass (a run's ``feature_dtype``) on ``device``, or
    ``None`` for float32: ``"auto"`` is bf16 only where the device computes it natively (CUDA's
    query; :func:`cpu_bf16_native` on CPU). ``bf16_native`` overrides the query (tests)."""
    if feature_dtype == "float32":
        return None
    if feature_dtype == "bf16":
        return torch.bfloat16
    if feature_dtype != "auto":
        raise ValueError(f"feature_dtype must be float32, bf16 or auto, got {feature_dtype!r}")
    if bf16_native is None:
        bf16_native = (bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if device.type == "cuda"
                       else cpu_bf16_native())
    return torch.bfloat16 if bf16_native else None


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    # Only the backbone runs in ``dtype``: IQAModel.forward switches autocast off for its head.
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (..., 3, H, W) on CPU -> float in [0, 1] on ``device`` (converted after the copy)."""
    return images.to(device, non_blocking=True).float().div_(255.0)

