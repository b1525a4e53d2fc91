#!/usr/bin/env python
"""Pre-generation throughput: Ray Data vs a plain single-process loop over the same work.

Both engines run the identical pipeline (`iqa_ray.data.pregenerate.run.pregenerate`: calibration
pass + generation pass) on the same config into fresh folders; the Ray run reuses one Ray
instance started beforehand. Outputs are checked to be identical before a ratio is reported.

Two one-time costs of a new Ray cluster are timed and reported on their own, not folded into the
throughput ratio: ``ray.init`` and the first Ray Data job (``cold``: Ray Data starts its stats and
autoscaling actors and every worker imports Ray Data and the pipeline; on 2 cores this costs
about 10 s, once per cluster). Then ``--repeats`` pairs run back to back, the plain loop and Ray
Data on the same work, and each pair gives one ratio; the median and the range are reported.

    python benchmarks/pregen_throughput.py                 # embedded set, per-image 10, 5 pairs
    python benchmarks/pregen_throughput.py --num-cpus 1    # scaling table: 1 CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

from iqa_ray.data.pregenerate.config import PregenConfig
from iqa_ray.data.pregenerate.run import pregenerate
from iqa_ray.data.pregenerate.store import read_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-image", type=int, default=10)
    p.add_argument("--crops-per-unit", type=int, default=4)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=5, help="plain-loop / Ray Data pairs (default 5)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    config = PregenConfig(per_image=args.per_image)

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t

    def run(engine: str) -> tuple[float, object, int]:
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            ds = pregenerate(config, out, engine=engine, crops_per_unit=args.crops_per_unit)
            seconds = time.perf_counter() - t
            return seconds, read_shards(ds).to_pandas(), ds.stats["processed"]

    cold_s, cold_out, images = run("ray")
    results = []
    for _ in range(args.repeats):
        local_s, local_out, _ = run("local")
        ray_s, ray_out, _ = run("ray")
        results.append({"local_s": local_s, "ray_s": ray_s, "speedup": local_s / ray_s,
                        "identical": bool(local_out.equals(ray_out) and cold_out.equals(ray_out))})
    ray.shutdown()
    ratios = sorted(r["speedup"] for r in results)
    summary = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "ray_cpus": args.num_cpus,
        "config": {"per_image": args.per_image, "crops_per_unit": args.crops_per_unit},
        "images": images,
        "ray_init_s": round(ray_start, 2),
        "ray_cold_first_job_s": round(cold_s, 2),
        "runs": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
        "local_images_per_s_median": round(images / statistics.median(r["local_s"] for r in results), 1),
        "ray_images_per_s_median": round(images / statistics.median(r["ray_s"] for r in results), 1),
        "speedup_median": round(statistics.median(ratios), 2),
        "speedup_min": round(ratios[0], 2),
        "speedup_max": round(ratios[-1], 2),
        "all_identical": all(r["identical"] for r in results),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
