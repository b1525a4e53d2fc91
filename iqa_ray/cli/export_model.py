"""``iqa-ray export-model MODEL --out model.pt [--onnx model.onnx]``: a trained model as one
TorchScript file (and ONNX) with its preprocessing inside, which scores images without iqa-ray
(:mod:`iqa_ray.evaluation.portable`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None, prog: str = "iqa-ray export-model") -> int:
    p = argparse.ArgumentParser(prog=prog, description=(
        "Write a trained model as one TorchScript file (and optionally ONNX) holding its preprocessing (resize "
        "rule, patch grid, averaging) and a description (iqa_ray.json), so it scores uint8 (N, 3, H, W) RGB "
        "images without iqa-ray: torch.jit.load(PATH)(images) -> (N,) scores on the label's 0-100 scale. MODEL: "
        "an experiment folder (its selected trial), a trial folder, a run folder or a checkpoint file."))
    p.add_argument("model", help="experiment, trial or run folder, or checkpoint file")
    p.add_argument("--out", required=True, help="TorchScript file to write (e.g. model.pt)")
    p.add_argument("--onnx", help="also write ONNX here (needs the [export] extra: onnx, onnxscript, onnxruntime)")
    p.add_argument("--onnx-size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                   help="input size the ONNX graph is built for (default: the run's image_size, else its crop size)")
    args = p.parse_args(argv)
    from iqa_ray.evaluation.portable import export_onnx, export_torchscript
    from iqa_ray.evaluation.scoring import ScoreError, load_model

    try:
        scorer = load_model(args.model, device="cpu")
        path = export_torchscript(scorer, args.out)
        print(f"[export-model] {scorer!r}\n[export-model] TorchScript written to {path}", file=sys.stderr)
        if args.onnx:
            d = scorer.config.data
            if args.onnx_size:
                width, height = args.onnx_size
            elif d.image_size:
                width, height = d.image_size
            else:
                width = height = d.crop_size
            if min(width, height) < 1:
                raise ScoreError(f"--onnx-size must be two positive integers, got {width} {height}")
            onnx_path = export_onnx(scorer, args.onnx, height=height, width=width)
            print(f"[export-model] ONNX for {width}x{height} images written to {onnx_path}", file=sys.stderr)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
