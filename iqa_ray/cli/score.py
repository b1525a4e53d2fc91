"""``iqa-ray score MODEL IMAGE_OR_FOLDER ... [--out scores.csv]``: your own images scored by a
trained model (:func:`iqa_ray.evaluation.scoring.load_model`), as ``image,score`` CSV."""

from __future__ import annotations

import argparse
import csv
import io
import sys


def build_parser(prog: str = "iqa-ray score") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(
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


def main(argv: list[str] | None = None, prog: str = "iqa-ray score") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda, but torch sees no CUDA device here; use --device cpu", file=sys.stderr)
            return 2
    from iqa_ray.evaluation.scoring import ScoreError, image_files, load_model

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
        from iqa_ray.core.io import atomic_write_text

        atomic_write_text(args.out, buffer.getvalue())
    else:
        sys.stdout.write(buffer.getvalue())
    failed = missing + result.failed
    for item in failed:
        print(f"[score] skipped {item['image']}: {item['error']}", file=sys.stderr)
    where = f" to {args.out}" if args.out else ""
    print(f"[score] {len(result.paths)} scored{where}, {len(failed)} skipped", file=sys.stderr)
    return 0 if result.paths else 1
