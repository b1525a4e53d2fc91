"""The ``iqa-ray`` command: one entry point with a subcommand per job, one module each in this package.

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

``iqa-ray SUBCOMMAND --help`` lists each one's flags. ``python -m iqa_ray SUBCOMMAND`` is the same
command, and the ``launch/*.py`` scripts call the same ``main`` functions
(``launch/tune_ranking.py`` is ``iqa-ray tune --study ranking``). Each subcommand's module is
imported only when it runs, so ``--help`` does not load torch or Ray.
"""

from __future__ import annotations

import importlib
import sys

PROG = "iqa-ray"

# name -> (module in this package with main(argv, prog), one line of help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "tune": ("tune", "run a hyperparameter search on Ray Tune (default study: ranking)"),
    "train": ("train", "train one configuration without Ray"),
    "pregenerate": ("pregenerate", "generate a distorted dataset once, on Ray Data"),
    "pretrain": ("pretrain", "quality-aware self-supervised pre-training of a backbone"),
    "evaluate": ("evaluate", "cross-dataset table of a trained model"),
    "score": ("score", "score your own images with a trained model (CSV)"),
    "export": ("export", "trials.parquet / epochs.parquet of a search"),
    "export-model": ("export_model", "a trained model as TorchScript / ONNX that runs without iqa-ray"),
    "report": ("report", "the analysis notebooks executed on an experiment, as HTML in EXPERIMENT/report/"),
    "tensorboard": ("tensorboard", "TensorBoard command (or server) for a search"),
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
    module = importlib.import_module(f"{__name__}.{SUBCOMMANDS[name][0]}")
    return module.main(rest, prog=f"{PROG} {name}")
