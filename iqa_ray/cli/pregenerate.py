"""Pre-generate a distorted IQA dataset once, on Ray Data, for many trainings to share.

Examples (``iqa-ray pregenerate`` and ``python launch/pregenerate.py`` are the same command):
    iqa-ray pregenerate --source embedded --strength medium --per-image 5 --out data/
    iqa-ray pregenerate --sample 0.1 --out /tmp/quick          # a quick run
    iqa-ray pregenerate --source folder --source-path ~/photos --out data/
    iqa-ray pregenerate --address auto --out /shared/data      # an existing Ray cluster

The dataset lands in OUT/<source>-<strength>-<hash>/; re-running with the same options reuses
it, and different options write a new folder beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iqa_ray.cli.args import positive_int
from iqa_ray.core.paths import default_data_dir
from iqa_ray.data.distortions.registry import DISTORTIONS, STRENGTH_PRESETS
from iqa_ray.data.pregenerate.config import PregenConfig
from iqa_ray.data.pregenerate.run import pregenerate
from iqa_ray.data.pregenerate.store import summary_lines
from iqa_ray.data.sources import SOURCE_KINDS
from iqa_ray.search.cluster import init_ray


def build_parser(prog: str = "iqa-ray pregenerate") -> argparse.ArgumentParser:
    d = PregenConfig()  # defaults live in one place: the config
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=SOURCE_KINDS, default="embedded",
                   help="where reference photos come from (default: embedded, photos shipped in pip packages)")
    p.add_argument("--source-path", help="folder of images, a saved Hugging Face dataset, or a hub name (hf)")
    p.add_argument("--hf-split", help="split of a Hugging Face dataset (default: train)")
    p.add_argument("--image-column", help="image column of a Hugging Face dataset (default: first image column)")
    p.add_argument("--limit", type=positive_int, help="use only the first N references")
    p.add_argument("--strength", choices=list(STRENGTH_PRESETS), default=d.strength,
                   help=f"level range: light 0.1-0.4, medium 0.2-0.6, heavy 0.3-1.0 (default: {d.strength})")
    p.add_argument("--per-image", type=positive_int, default=d.per_image,
                   help=f"distorted versions per reference crop (default: {d.per_image})")
    p.add_argument("--crop-size", type=positive_int, default=d.crop_size,
                   help=f"reference crop side in pixels (default: {d.crop_size})")
    p.add_argument("--max-crops-per-photo", type=positive_int, default=d.max_crops_per_photo,
                   help=f"crops per source photo at most (default: {d.max_crops_per_photo})")
    p.add_argument("--max-short-side", type=positive_int, default=d.max_short_side,
                   help=f"downscale photos so the short side is at most this (default: {d.max_short_side})")
    p.add_argument("--distortions", nargs="+", metavar="TYPE", default=[],
                   help=f"distortion types to use (default: all): {' '.join(DISTORTIONS)}")
    p.add_argument("--no-references", action="store_true", help="do not store the pristine crops")
    p.add_argument("--split", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"), default=d.split_fractions,
                   help="fractions of source photos per split (default: %s)" % " ".join(map(str, d.split_fractions)))
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of split, choices and distortions (default: {d.seed})")
    p.add_argument("--sample", type=float, default=1.0, help="fraction of crops to generate, e.g. 0.1 (default: 1.0)")
    p.add_argument("--out", type=Path, default=None, help=f"output root (default: {default_data_dir()})")
    p.add_argument("--engine", choices=["ray", "local"], default="ray",
                   help="ray: Ray Data across the cluster (default); local: a plain loop in this process")
    p.add_argument("--crops-per-unit", type=positive_int, default=4, help="crops per Ray Data block (default: 4)")
    p.add_argument("--address", help="address of an existing Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs for a local Ray instance (default: all)")
    p.add_argument("--force", action="store_true", help="regenerate even if a finished dataset exists")
    return p


def main(argv: list[str] | None = None, prog: str = "iqa-ray pregenerate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        config = PregenConfig(
            source=args.source, source_path=args.source_path, hf_split=args.hf_split, image_column=args.image_column,
            limit=args.limit, strength=args.strength, per_image=args.per_image, crop_size=args.crop_size,
            max_crops_per_photo=args.max_crops_per_photo, max_short_side=args.max_short_side,
            distortions=tuple(args.distortions), include_references=not args.no_references,
            split_fractions=tuple(args.split), seed=args.seed, sample=args.sample,
        )
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.engine == "ray":
        init_ray(address=args.address, num_cpus=args.num_cpus)
    out = args.out or default_data_dir()
    dataset = pregenerate(config, out, engine=args.engine, crops_per_unit=args.crops_per_unit, force=args.force,
                          progress=lambda msg: print(f"[pregenerate] {msg}", flush=True), progress_bar=True)
    print("\n".join(summary_lines(dataset)))
    if dataset.stats["failed"]:
        print(f"warning: {dataset.stats['failed']} inputs failed; see {dataset.path / 'processing_stats.json'}")
    return 0

