"""A trained model as one file that runs without iqa-ray: TorchScript, and ONNX where it exports.

The exported module takes a batch of images as a ``uint8`` tensor ``(N, 3, H, W)`` (RGB, 0-255,
every image of the batch the same size) and returns one ``float32`` score per image, on the
training label's scale (0-100, higher is better). Inside it does what evaluation does to a test
photo after decoding (:class:`~iqa_ray.evaluation.scoring.IQAScorer`): the run's resize rule
(``image_size`` or ``short_side``; bicubic with antialiasing, then rounded to 8 bits, which is
what the decoder's PIL resize computes to 0.1-0.2 grey levels on average), the whole image or the run's
grid of ``eval_patches`` patches, and the patch scores averaged. What it cannot do is decode
files and apply EXIF orientation: give it upright RGB pixels (PIL's ``ImageOps.exif_transpose``).

Beside the module the file holds ``iqa_ray.json`` (TorchScript extra file; ONNX metadata
``iqa_ray``): the family, backbone, preprocessing, label scale and where the model came from.

    iqa-ray export-model RESULTS/<name> --out model.pt [--onnx model.onnx]

    import torch
    model = torch.jit.load("model.pt")                       # no iqa_ray import needed
    scores = model(torch.from_numpy(rgb).permute(2, 0, 1)[None])  # (1,) float32
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from iqa_ray.evaluation.scoring import IQAScorer, ScoreError
from iqa_ray.training.config import TrainConfig

META_NAME = "iqa_ray.json"


class _Network(nn.Module):
    """The trained network with its score as a plain tensor (tracing wants tensors, not dicts)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)["score"].float()


class PortableScorer(nn.Module):
    """Preprocessing and patch averaging around a traced network (scripted as a whole)."""

    def __init__(self, network: nn.Module, crop: int, patches: int, whole_image: bool,
                 width: int, height: int, short_side: int, chunk: int) -> None:
        super().__init__()
        self.network = network
        self.crop, self.patches, self.whole_image = crop, patches, whole_image
        self.width, self.height, self.short_side = width, height, short_side  # 0: not set
        self.chunk = chunk

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        if self.width > 0:
            return self.height, self.width
        if self.short_side > 0:
            short = min(w, h)
            if short == self.short_side:
                return h, w
            factor = self.short_side / short
            if w <= h:
                return max(1, int(_round_half_even(h * factor))), self.short_side
            return self.short_side, max(1, int(_round_half_even(w * factor)))
        return h, w

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.size(1) != 3:
            raise ValueError("expected uint8 images (N, 3, H, W)")
        x = images.float()
        h, w = self.target_size(int(x.size(2)), int(x.size(3)))
        if h != x.size(2) or w != x.size(3):
            x = F.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
            x = x.round().clamp(0.0, 255.0)
        n = x.size(0)
        if self.whole_image:
            patches = x.unsqueeze(1)
        else:
            c = self.crop
            if h < c or w < c:
                raise ValueError("image smaller than the model's patches")
            crops: list[Tensor] = []
            for y, xx in _grid(h, w, c, self.patches):
                crops.append(x[:, :, y:y + c, xx:xx + c])
            patches = torch.stack(crops, dim=1)
        flat = patches.flatten(0, 1).div(255.0)
        if self.chunk <= 0:  # one pass (the ONNX graph, whose batch size is symbolic)
            return self.network(flat).view(n, -1).mean(dim=1)
        parts: list[Tensor] = []
        for start in range(0, flat.size(0), self.chunk):
            parts.append(self.network(flat[start:start + self.chunk]))
        return torch.cat(parts).view(n, -1).mean(dim=1)


def _round_half_even(v: float) -> float:
    """Python's ``round`` (half to even), written so TorchScript compiles it."""
    f = float(math.floor(v))
    d = v - f
    if d > 0.5 or (d == 0.5 and int(f) % 2 == 1):
        return f + 1.0
    return f


def _grid(h: int, w: int, c: int, n: int) -> list[tuple[int, int]]:
    """:func:`iqa_ray.data.decoded.grid_positions`, in TorchScript's subset of Python."""
    if n == 1:
        return [((h - c) // 2, (w - c) // 2)]
    rows = int(math.floor(math.sqrt(float(n))))
    cols = int(math.ceil(float(n) / rows))
    ys = _linspace_round(h - c, rows)
    xs = _linspace_round(w - c, cols)
    out: list[tuple[int, int]] = []
    for y in ys:
        for x in xs:
            if len(out) < n:
                out.append((y, x))
    return out


def _linspace_round(stop: int, num: int) -> list[int]:
    """``np.linspace(0, stop, num).round()`` (numpy: start + i * step, the last value exactly stop)."""
    if num == 1:
        return [0]
    step = float(stop) / (num - 1)
    out: list[int] = []
    for i in range(num):
        v = float(stop) if i == num - 1 else i * step
        out.append(int(_round_half_even(v)))
    return out


def metadata(scorer: IQAScorer) -> dict[str, Any]:
    c: TrainConfig = scorer.config
    d, m = c.data, c.model
    try:
        version = importlib.metadata.version("iqa-ray")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        version = "source tree"
    from iqa_ray.evaluation.ensemble import EnsembleNetwork

    ensemble = ({"members": len(scorer.model.members), "weights": [float(w) for w in scorer.model.weights]}
                if isinstance(scorer.model, EnsembleNetwork) else None)  # family and backbone: its first member's
    return {"format": 1, "iqa_ray": version, "source": scorer.source, "family": m.family, "backbone": m.backbone,
            **({"ensemble": ensemble} if ensemble else {}),
            "input": "uint8 (N, 3, H, W) RGB, upright (EXIF applied), every image of a batch the same size",
            "output": "float32 (N,): the label's scale, 0-100, higher is better",
            "label": d.label, "dataset": str(d.dataset),
            "image_size": list(d.image_size) if d.image_size else None, "short_side": d.short_side,
            "resize": "bicubic, antialiased, rounded to 8 bits", "whole_image": d.whole_image,
            "crop_size": d.crop_size, "eval_patches": d.eval_patches, "patch_placement": "grid"}


def portable_module(scorer: IQAScorer) -> PortableScorer:
    """The scorer's network and preprocessing as an eager module on CPU in float32."""
    d = scorer.config.data
    if not d.whole_image and d.patch_placement != "grid":
        raise ScoreError(f"patch_placement = {d.patch_placement!r}: the seeded positions are keyed by each file's "
                         "name, which an exported model never sees; only grid placement exports (retrain with "
                         "--set patch_placement=grid, or score with iqa-ray score)")
    model = copy.deepcopy(scorer.model).float().cpu().eval()
    model.requires_grad_(False)  # an inference artefact: scores come out without autograd history
    width, height = (d.image_size if d.image_size else (0, 0))
    return PortableScorer(_Network(model), d.crop_size, d.eval_patches, d.whole_image, int(width), int(height),
                          int(d.short_side or 0), int(d.eval_chunk)).eval()


def _example(scorer: IQAScorer) -> Tensor:
    d = scorer.config.data
    side = d.crop_size
    if d.whole_image and d.image_size:
        return torch.zeros(2, 3, d.image_size[1], d.image_size[0])
    return torch.rand(2, 3, side, side)


def export_torchscript(scorer: IQAScorer, path: str | os.PathLike[str]) -> Path:
    """Write ``scorer`` as one TorchScript file (written whole or not at all)."""
    module = portable_module(scorer)
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript as deprecated (FutureWarning) while it still loads everywhere,
        # C++ included; the tracer's note about a backbone's input check (a constant here) is noise.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module.network, _example(scorer), check_trace=False)
        module.network = traced
        scripted = torch.jit.script(module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(tmp), _extra_files={META_NAME: json.dumps(metadata(scorer), indent=2)})
    os.replace(tmp, path)
    return path


def export_onnx(scorer: IQAScorer, path: str | os.PathLike[str], height: int, width: int) -> Path:
    """Write ``scorer`` as ONNX for images of ``height`` x ``width`` (any batch size).

    ONNX graphs fix the patch grid, so the input size is part of the export; the resize rule
    (if any) is applied to that size inside the graph as in TorchScript.
    """
    try:
        import onnx
    except ImportError:
        raise ScoreError("ONNX export needs the onnx, onnxscript and onnxruntime packages: "
                         "pip install 'iqa-ray[export]'") from None
    module = portable_module(scorer)
    module.chunk = 0  # a loop over a symbolic batch would fix the batch size; ONNX runtimes bound memory themselves
    example = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"], output_names=["scores"],
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
    program.save(str(tmp))
    proto = onnx.load(str(tmp))
    meta = {**metadata(scorer), "input": f"uint8 (N, 3, {height}, {width}) RGB, upright (EXIF applied)"}
    entry = proto.metadata_props.add()
    entry.key, entry.value = "iqa_ray", json.dumps(meta)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``iqa_ray.json`` stored beside an exported TorchScript model."""
    files = {META_NAME: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[META_NAME])


__all__ = ["export_torchscript", "export_onnx", "load_metadata", "portable_module", "PortableScorer"]
