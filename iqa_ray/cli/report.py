"""``iqa-ray report EXPERIMENT``: the analysis notebooks executed on one experiment, as HTML.

Each notebook of ``analysis/`` that applies to the experiment is executed headless (nbclient, a
``python3`` kernel of this interpreter) with ``IQA_EXPERIMENT`` (and ``IQA_EXPERIMENTS``) pointing
at it, and written with its figures embedded to ``EXPERIMENT/report/<notebook>.html``, with an
``index.html`` linking them; the figures also stay in ``EXPERIMENT/figures/``. Users look at a
search without Jupyter. A notebook that fails is reported by name with its error; the others are
still written, and the command exits 1.

    iqa-ray report RESULTS/<name> [--notebooks ranking_study run_report ...] [--timeout 600]
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from pathlib import Path

ANALYSIS = Path(__file__).resolve().parents[2] / "analysis"
MULTI_OBJECTIVE = "multi-objective"  # applies to experiments whose study names several objectives
# (notebook, what it shows, studies it applies to: None = every study, or MULTI_OBJECTIVE)
NOTEBOOKS: tuple[tuple[str, str, tuple[str, ...] | str | None], ...] = (
    ("ranking_study", "validation SRCC over alpha x margin, learning curves, where ASHA stopped trials", ("ranking",)),
    ("hyperparameters", "score against every searched axis, with the edge check", None),
    ("family_comparison", "validation and test SRCC per family and backbone, spread of every trial", None),
    ("run_report", "the selected trial: training curves, test predictions, sample predictions, feature PCA, clusters", None),
    ("pareto_front", "validation SRCC against latency: the Pareto front, the selected trial, the dominated ones",
     MULTI_OBJECTIVE),
)


class ReportError(ValueError):
    """An experiment or notebook selection the report cannot use; the message says why."""


def experiment_info(experiment: Path) -> dict:
    info = experiment / "experiment.json"
    return json.loads(info.read_text()) if info.exists() else {}


def _applies(studies: tuple[str, ...] | str | None, info: dict) -> bool:
    if studies is None:
        return True
    if studies == MULTI_OBJECTIVE:
        return len(info.get("objectives") or ()) > 1
    return info.get("study") in studies


def chosen_notebooks(experiment: Path, names: list[str] | None) -> list[str]:
    known = [n for n, _, _ in NOTEBOOKS]
    if names:
        bad = [n for n in names if n not in known]
        if bad:
            raise ReportError(f"unknown notebook(s) {', '.join(bad)}; valid: {', '.join(known)}")
        return names
    info = experiment_info(experiment)
    return [n for n, _, studies in NOTEBOOKS if _applies(studies, info)]


def execute(name: str, experiment: Path, timeout: int):
    """Run ``analysis/<name>.ipynb`` against ``experiment``; returns the notebook and the error, if any."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(ANALYSIS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(ANALYSIS)}})
    env = {**os.environ, "IQA_EXPERIMENT": str(experiment), "IQA_EXPERIMENTS": str(experiment)}
    try:
        client.execute(env=env)
    except CellExecutionError as exc:
        return nb, str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return nb, None


def to_html(nb) -> str:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return body


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_report(experiment: str | os.PathLike[str], names: list[str] | None = None, timeout: int = 600,
                 log=print) -> tuple[Path, dict[str, str | None]]:
    """Execute the notebooks on ``experiment`` and write ``report/``; returns its folder and each
    notebook's error (``None``: written)."""
    experiment = Path(experiment).expanduser().resolve()
    if not experiment.is_dir():
        raise ReportError(f"no such experiment folder: {experiment}")
    if not (experiment / "trials.parquet").exists():
        raise ReportError(f"{experiment} holds no trials.parquet: give an experiment folder (RESULTS/<name>), or "
                          f"export one first with iqa-ray export {experiment}")
    if not ANALYSIS.is_dir():
        raise ReportError(f"the analysis notebooks are not here ({ANALYSIS}): the report runs from a source "
                          "checkout of iqa-ray (pip install -e .)")
    names = chosen_notebooks(experiment, names)
    out = experiment / "report"
    out.mkdir(exist_ok=True)
    results: dict[str, str | None] = {}
    for name in names:
        start = time.perf_counter()
        nb, error = execute(name, experiment, timeout)
        results[name] = error
        if error is None:
            write_atomic(out / f"{name}.html", to_html(nb))
            log(f"[report] {name}: {out / (name + '.html')} ({time.perf_counter() - start:.0f} s)")
        else:
            log(f"[report] {name} FAILED: {error}")
    rows = []
    for name, text, _ in NOTEBOOKS:
        if name in results:
            status = (f'<a href="{name}.html">{name}</a>' if results[name] is None
                      else f"{name} (failed: {html.escape(results[name])})")
            rows.append(f"<li>{status}: {html.escape(text)}</li>")
    summary = ""
    if (experiment / "summary.json").exists():
        s = json.loads((experiment / "summary.json").read_text())
        summary = f"<pre>{html.escape(json.dumps({k: v for k, v in s.items() if not isinstance(v, (dict, list))}, indent=1))}</pre>"
    write_atomic(out / "index.html", f"<!doctype html><html><head><meta charset='utf-8'><title>iqa-ray report: "
                 f"{html.escape(experiment.name)}</title></head><body><h1>{html.escape(experiment.name)}</h1>"
                 f"<ul>{''.join(rows)}</ul>{summary}<p>Figures: <code>{html.escape(str(experiment / 'figures'))}"
                 "</code></p></body></html>")
    return out, results


def main(argv: list[str] | None = None, prog: str = "iqa-ray report") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] + " Writes EXPERIMENT/report/.")
    p.add_argument("experiment", help="an experiment folder (RESULTS/<name>)")
    p.add_argument("--notebooks", nargs="+", metavar="NAME",
                   help=f"which ones (default: those that apply to the study): {', '.join(n for n, _, _ in NOTEBOOKS)}")
    p.add_argument("--timeout", type=int, default=600, help="seconds per notebook cell (default: 600)")
    args = p.parse_args(argv)
    try:
        out, results = build_report(args.experiment, args.notebooks, args.timeout,
                                    log=lambda m: print(m, file=sys.stderr, flush=True))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [n for n, e in results.items() if e is not None]
    print(f"[report] {len(results) - len(failed)} of {len(results)} notebooks written to {out / 'index.html'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0

