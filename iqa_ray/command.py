"""The ``iqa-ray`` command: one installed entry point with a subcommand per job.

    iqa-ray tune [--study NAME|FILE] [flags]   a hyperparameter search (default study: ranking)
    iqa-ray train [flags]                      one configuration without Ray
    iqa-ray pregenerate [flags]                a distorted dataset, generated once on Ray Data
    iqa-ray pretrain [flags]                   quality-aware self-supervised pre-training
    iqa-ray evaluate MODEL --dataset SPEC ...  the cross-dataset table
    iqa-ray score MODEL IMAGE_OR_FOLDER ...    scores of your own images, as CSV
    iqa-ray export EXPERIMENT                  trials.parquet / epochs.parquet of a search
    iqa-ray export-model MODEL --out model.pt  the model as TorchScript (and ONNX), runs without iqa-ray
    iqa-ray report EXPERIMENT                  the analysis notebooks run on it, as HTML (EXPERIMENT/report/)
    iqa-ray tensorboard EXPERIMENT [--start]   TensorBoard for a search

``iqa-ray SUBCOMMAND --help`` lists each one's flags. The ``launch/*.py`` scripts and the
``python -m iqa_ray.<module>`` forms stay as aliases of the same code.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from typing import Callable

PROG = "iqa-ray"


def _tune(argv: list[str]) -> int:
    from iqa_ray.search.launcher import main

    if any(a == "--study" or a.startswith("--study=") for a in argv):
        return main(argv, prog=f"{PROG} tune")
    return main(argv, study="ranking", prog=f"{PROG} tune")


def _train(argv: list[str]) -> int:
    from iqa_ray.train import main

    return main(argv)


def _pregenerate(argv: list[str]) -> int:
    from iqa_ray.pregen import main

    return main(argv, prog=f"{PROG} pregenerate")


def _pretrain(argv: list[str]) -> int:
    from iqa_ray.pretrain import main

    return main(argv)


def _evaluate(argv: list[str]) -> int:
    from iqa_ray.evaluate import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from iqa_ray.export import main

    return main(argv)


def _report(argv: list[str]) -> int:
    from iqa_ray.report import main

    return main(argv, prog=f"{PROG} report")


def _tensorboard(argv: list[str]) -> int:
    from iqa_ray.search.tensorboard import main

    return main(argv)


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} score", description=(
        "Score images with a trained model and write `image,score` CSV (scores on the model's training label "
        "scale). MODEL: an experiment folder (its selected trial), a trial folder, a run folder or a checkpoint "
        "file. Inputs: image files and folders (searched recursively for .jpg .jpeg .png .bmp .tif .tiff .webp). "
        "Unreadable files are reported on stderr and skipped; the others are scored."))
    p.add_argument("model", help="experiment, trial or run folder, or checkpoint file")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", help="CSV file to write (default: standard output)")
    p.add_argument("--batch-size", type=int, default=64, help="images decoded and scored at a time (default: 64)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _score(argv: list[str]) -> int:
    args = score_parser().parse_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda, but torch sees no CUDA device here; use --device cpu", file=sys.stderr)
            return 2
    from iqa_ray.scoring import ScoreError, image_files, load_model

    try:
        scorer = load_model(args.model, device=args.device)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files, missing = image_files(args.inputs)
    if not files:
        print(f"error: no image files in {' '.join(args.inputs)} (looked for "
              ".jpg .jpeg .png .bmp .tif .tiff .webp)", file=sys.stderr)
        return 2
    print(f"[score] {len(files)} images with {scorer!r}", file=sys.stderr, flush=True)
    from tqdm import tqdm

    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=args.quiet, desc="scoring") as bar:
        result = scorer.score_files(files, batch_size=args.batch_size, progress=bar.update)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "score"])
    for path, score in zip(result.paths, result.scores):
        writer.writerow([path, f"{score:.6f}"])
    if args.out:
        from iqa_ray.utils.io import atomic_write_text

        atomic_write_text(args.out, buffer.getvalue())
    else:
        sys.stdout.write(buffer.getvalue())
    failed = missing + result.failed
    for item in failed:
        print(f"[score] skipped {item['image']}: {item['error']}", file=sys.stderr)
    where = f" to {args.out}" if args.out else ""
    print(f"[score] {len(result.paths)} scored{where}, {len(failed)} skipped", file=sys.stderr)
    return 0 if result.paths else 1


def _export_model(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} export-model", description=(
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
    from iqa_ray.portable import export_onnx, export_torchscript
    from iqa_ray.scoring import ScoreError, load_model

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


SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "tune": (_tune, "run a hyperparameter search on Ray Tune (default study: ranking)"),
    "train": (_train, "train one configuration without Ray"),
    "pregenerate": (_pregenerate, "generate a distorted dataset once, on Ray Data"),
    "pretrain": (_pretrain, "quality-aware self-supervised pre-training of a backbone"),
    "evaluate": (_evaluate, "cross-dataset table of a trained model"),
    "score": (_score, "score your own images with a trained model (CSV)"),
    "export": (_export, "trials.parquet / epochs.parquet of a search"),
    "export-model": (_export_model, "a trained model as TorchScript / ONNX that runs without iqa-ray"),
    "report": (_report, "the analysis notebooks executed on an experiment, as HTML in EXPERIMENT/report/"),
    "tensorboard": (_tensorboard, "TensorBoard command (or server) for a search"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "\n".join(f"  {name:<13} {text}" for name, (_, text) in SUBCOMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} SUBCOMMAND [flags]   ({PROG} SUBCOMMAND --help for its flags)\n\nsubcommands:\n{usage}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}; valid: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    return SUBCOMMANDS[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
