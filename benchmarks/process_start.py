#!/usr/bin/env python
"""What every process Ray starts pays before it works: the environment's import of ``rfc3987_syntax``.

Ray imports jsonschema in every process it starts (the daemons of a ``ray.init``, the workers that
run tasks, every trial actor). jsonschema imports ``rfc3987_syntax`` when it is installed, and that
module builds an Earley parser from its grammar at import. JupyterLab installs it (jupyterlab ->
jupyter_server -> jupyter-events -> ``jsonschema[format-nongpl]``), which is why JupyterLab is its
own extra (``.[lab]``) and not in ``.[dev]``.

Each measurement runs twice, in fresh processes, one after the other on the same machine:
``as installed`` (this environment as it is) and ``blocked`` (a directory first on ``PYTHONPATH``
holds an ``rfc3987_syntax`` package that raises ``ImportError``, so jsonschema goes on without it,
as it does where the package is not installed; every process Ray starts inherits the variable).

1. ``import ray`` in a new interpreter: CPU seconds (user + system), median of ``--repeats``;
2. a Ray start: ``ray.init`` (no dashboard, 2 CPUs), one task and one actor, then the CPU seconds
   of every process Ray started (daemons, the prestarted workers, the task's and the actor's) and
   of the driver, and the wall time;
3. with ``--search``: ``launch/tune_ranking.py --smoke-test`` (the end-to-end tests' smallest
   search), its wall time.

Nothing is uninstalled. Without ``rfc3987_syntax`` installed both columns measure the same thing.

    python benchmarks/process_start.py [--repeats 5] [--search] [--json benchmarks/results/process_start.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

IMPORT_RAY = """
import json, resource, sys
import ray
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu": u.ru_utime + u.ru_stime, "lark": "lark" in sys.modules}))
"""

RAY_START = """
import json, resource, time
t = time.perf_counter()
import psutil, ray
ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False)

@ray.remote
def task():
    return 1

@ray.remote
class Actor:
    def ping(self):
        return 1

ray.get(task.remote())
actor = Actor.remote()
ray.get(actor.ping.remote())
wall = time.perf_counter() - t
children = 0.0
for proc in psutil.Process().children(recursive=True):
    try:
        c = proc.cpu_times()
    except psutil.NoSuchProcess:
        continue
    children += c.user + c.system
u = resource.getrusage(resource.RUSAGE_SELF)
ray.shutdown()
print(json.dumps({"children_cpu": children, "driver_cpu": u.ru_utime + u.ru_stime, "wall": wall}))
"""


def _blocked_env(block_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(block_dir), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run_json(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _smoke_search(env: dict[str, str], results: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "launch" / "tune_ranking.py"), "--smoke-test"], check=True,
                   env={**env, "IQA_RAY_RESULTS": str(results)}, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="fresh interpreters per `import ray` figure")
    p.add_argument("--search", action="store_true", help="also time launch/tune_ranking.py --smoke-test both ways")
    p.add_argument("--json", type=Path, default=RESULTS / "process_start.json")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")

    installed = importlib.util.find_spec("rfc3987_syntax") is not None
    print(f"rfc3987_syntax installed: {installed}")
    record: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "rfc3987_syntax_installed": installed, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        block = Path(tmp) / "block"
        (block / "rfc3987_syntax").mkdir(parents=True)
        (block / "rfc3987_syntax" / "__init__.py").write_text(
            'raise ImportError("rfc3987_syntax blocked by benchmarks/process_start.py")\n')
        for name, env in (("as installed", dict(os.environ)), ("blocked", _blocked_env(block))):
            imports = [_run_json(IMPORT_RAY, env) for _ in range(args.repeats)]
            start = _run_json(RAY_START, env)
            row = {"import_ray_cpu_s": statistics.median(r["cpu"] for r in imports),
                   "import_ray_loads_lark": any(r["lark"] for r in imports),
                   "ray_start_children_cpu_s": start["children_cpu"], "ray_start_driver_cpu_s": start["driver_cpu"],
                   "ray_start_wall_s": start["wall"]}
            if args.search:
                row["smoke_search_wall_s"] = _smoke_search(env, Path(tmp) / name.replace(" ", "_"))
            record["variants"][name] = row
            print(name, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    a, b = record["variants"]["as installed"], record["variants"]["blocked"]
    for key in ("import_ray_cpu_s", "ray_start_children_cpu_s", "ray_start_wall_s", "smoke_search_wall_s"):
        if key in a:
            print(f"{key}: as installed {a[key]:.2f}, blocked {b[key]:.2f}, ratio {a[key] / b[key]:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
