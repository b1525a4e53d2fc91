#!/usr/bin/env python
"""Decoded memory: what the decode-once cache costs the driver and Ray's object store.

A search decodes the whole dataset into ``uint8`` RGB arrays in the driver, then ``ray.put``\\s
it so every trial maps one shared copy (``iqa_ray/search/run.py``). This benchmark measures that
path on a synthetic KonIQ-10k-like folder (``--images`` JPEG photos at 1024x768, quality 90, in
the ``koniq10k`` adapter's layout so :func:`iqa_ray.data.catalog.load_table` reads it as
``koniq10k:<folder>``) for four configurations:

* decoded at the native 1024x768 and at ``image_size=512x384``;
* the driver keeping its decoded copy after ``ray.put``, or dropping it (``del decoded;
  gc.collect()``, as ``run.py`` does).

Each configuration runs in a fresh child process, so the driver's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that configuration alone. The child
starts ``ray.init(num_cpus=2, include_dashboard=False)`` before decoding (Ray's own processes
are not in the driver's RSS), decodes, puts, and reports:

* ``object_store_used_mb``: ``store_stats.object_store_bytes_used`` of the raylet's memory-info
  reply (``ray._private.internal_api.get_memory_info_reply``, the figure behind ``ray memory
  --stats-only``): bytes of objects in the node's plasma store after the put;
* the driver's ``VmRSS`` split into ``RssAnon`` (private memory: the decoded arrays) and
  ``RssShmem`` (pages of the shared-memory store the driver wrote while putting), before and
  after dropping its copy, and the peak;
* a Ray task that reads every pixel of the shared copy reports its own ``RssAnon`` and
  ``RssShmem``: trials map the store's copy instead of holding another one.

It also prints what :func:`iqa_ray.search.preflight.estimate_decoded_bytes` and
:func:`~iqa_ray.search.preflight.check_decoded_fits` say for KonIQ-10k's 10,073 images at
1024x768 on this machine, and how long the header-only estimate takes.

    python benchmarks/decoded_memory.py [--images 2000] [--json benchmarks/results/decoded_memory.json]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

KONIQ_IMAGES = 10_073
SIZE = (1024, 768)
CONFIGS = {
    "native_1024x768_keep": (None, True),
    "native_1024x768_drop": (None, False),
    "512x384_keep": ((512, 384), True),
    "512x384_drop": ((512, 384), False),
}
MB = 1e6


_GRAIN: list[np.ndarray] = []


def _write_photo(args: tuple[str, int]) -> int:
    """One smooth random 1024x768 photo (bicubic-upsampled random colour field + mild grain), JPEG q90.

    The grain (+-4 levels, so the JPEGs have a realistic size) is drawn once per process and
    shared by its photos; the colour field differs per photo.
    """
    from PIL import Image

    path, seed = args
    if not _GRAIN:
        _GRAIN.append(np.random.default_rng(12345).integers(-4, 5, size=(SIZE[1], SIZE[0], 3), dtype=np.int16))
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize(SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
    Image.fromarray(np.clip(image + _GRAIN[0], 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def make_dataset(root: Path, n: int) -> dict:
    """``root/1024x768/*.jpg`` + ``koniq10k_scores_and_distributions.csv`` (image_name, MOS on 1-5)."""
    images = root / "1024x768"
    images.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(n)]
    start = time.perf_counter()
    with Pool(min(2, os.cpu_count() or 1)) as pool:
        sizes = pool.map(_write_photo, [(str(images / name), i) for i, name in enumerate(names)], chunksize=16)
    rng = np.random.default_rng(0)
    with open(root / "koniq10k_scores_and_distributions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_name", "MOS"])
        for name in names:
            writer.writerow([name, f"{rng.uniform(1, 5):.3f}"])
    return {"images": n, "jpeg_mb": round(sum(sizes) / MB, 1), "generate_s": round(time.perf_counter() - start, 1)}


def _status() -> dict[str, float]:
    """This process's VmRSS / RssAnon / RssShmem in MB (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "RssFile"):
                out[key] = round(int(value.split()[0]) * 1024 / MB, 1)
    return out


def _store_used() -> int:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used)


def child(name: str, root: str) -> dict:
    """One configuration, in a fresh process; returns its figures."""
    import ray

    from iqa_ray.data.catalog import load_table
    from iqa_ray.data.decoded import decode_table

    image_size, keep = CONFIGS[name]
    table = load_table(f"koniq10k:{root}")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        store_total = ray.cluster_resources().get("object_store_memory", 0.0)
        before = _status()
        start = time.perf_counter()
        decoded = decode_table(table, image_size=image_size)
        decode_s = time.perf_counter() - start
        nbytes = decoded.nbytes
        after_decode = _status()
        start = time.perf_counter()
        ref = ray.put(decoded)
        put_s = time.perf_counter() - start
        used = _store_used()
        after_put = _status()
        if not keep:
            del decoded
            gc.collect()
        after_drop = _status()

        @ray.remote(num_cpus=1)
        def read_every_pixel(d):
            total = 0
            images = d.images
            for i in range(0, len(images), 64):
                total += int(images[i : i + 64].sum(dtype=np.uint64) % 1000)
            with open("/proc/self/status") as fh:
                fields = dict(line.split(":", 1) for line in fh)
            return {k: round(int(fields[k].split()[0]) * 1024 / MB, 1) for k in ("VmRSS", "RssAnon", "RssShmem")}

        worker = ray.get(read_every_pixel.remote(ref))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # ru_maxrss is KiB on Linux
        return {
            "config": name,
            "image_size": list(image_size) if image_size else "native",
            "driver_keeps_copy": keep,
            "images": len(table),
            "decoded_mb": round(nbytes / MB, 1),
            "decode_s": round(decode_s, 1),
            "put_s": round(put_s, 2),
            "object_store_total_mb": round(store_total / MB, 1),
            "object_store_used_mb": round(used / MB, 1),
            "driver_before_decode_mb": before,
            "driver_after_decode_mb": after_decode,
            "driver_after_put_mb": after_put,
            "driver_after_drop_mb": after_drop,
            "driver_peak_rss_mb": round(peak_mb, 1),
            "driver_peak_over_before_decode_mb": round(peak_mb - before["VmRSS"], 1),
            "driver_held_after_drop_mb": round(after_drop["VmRSS"] - before["VmRSS"], 1),
            "worker_reading_all_pixels_mb": worker,
        }
    finally:
        ray.shutdown()


def koniq_preflight() -> dict:
    """What the pre-flight says for KonIQ-10k at 1024x768 on this machine."""
    import pandas as pd

    from iqa_ray.core.errors import PreflightError
    from iqa_ray.search.preflight import check_decoded_fits, decoded_budget, estimate_decoded_bytes

    table = pd.DataFrame({"image_id": range(KONIQ_IMAGES), "path": [f"/koniq/{i}.jpg" for i in range(KONIQ_IMAGES)]})
    nbytes = estimate_decoded_bytes(table, image_size=SIZE)
    budget = decoded_budget()
    try:
        check_decoded_fits(nbytes, n_images=KONIQ_IMAGES, image_size=SIZE, dataset="koniq10k", min_side=128)
        verdict = "fits"
    except PreflightError as exc:
        verdict = str(exc)
    return {"images": KONIQ_IMAGES, "image_size": list(SIZE), "estimate_bytes": nbytes,
            "estimate_gb": round(nbytes / 1e9, 2), "available_memory_gb": round(budget.available_memory / 1e9, 2),
            "object_store_gb": round(budget.object_store_bytes / 1e9, 2), "limit_gb": round(budget.limit / 1e9, 2),
            "binding": budget.binding, "check_decoded_fits": verdict}


def header_estimates(root: Path) -> dict:
    """The header-only estimate of the generated folder, beside its true decoded size, and its cost."""
    import pandas as pd

    from iqa_ray.data.catalog import load_table
    from iqa_ray.search.preflight import estimate_decoded, estimate_decoded_bytes

    table = load_table(f"koniq10k:{root}")
    start = time.perf_counter()
    every = estimate_decoded_bytes(table)
    every_s = time.perf_counter() - start
    big = pd.concat([table] * (KONIQ_IMAGES // len(table) + 1), ignore_index=True).iloc[:KONIQ_IMAGES]
    start = time.perf_counter()
    sampled = estimate_decoded(big)
    sampled_s = time.perf_counter() - start
    return {"generated_table_estimate_mb": round(every / MB, 1), "generated_table_headers_read": len(table),
            "generated_table_estimate_s": round(every_s, 3),
            "koniq_sized_table_estimate_mb": round(sampled.nbytes / MB, 1),
            "koniq_sized_table_headers_read": sampled.headers_read,
            "koniq_sized_table_estimate_s": round(sampled_s, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="synthetic 1024x768 photos to generate (default 2000)")
    p.add_argument("--data", help="reuse (or create) the synthetic dataset in this folder instead of a temporary one")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.data)), flush=True)
        return

    import psutil
    import ray

    started = time.perf_counter()
    workdir = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="decoded_memory_"))
    try:
        csv_file = workdir / "koniq10k_scores_and_distributions.csv"
        if csv_file.exists() and sum(1 for _ in (workdir / "1024x768").glob("*.jpg")) == args.images:
            generated = {"images": args.images, "reused": str(workdir)}
        else:
            generated = make_dataset(workdir, args.images)
        print(f"[data] {generated}", flush=True)
        runs = []
        env = {**os.environ, "RAY_DEDUP_LOGS": "1", "OMP_NUM_THREADS": "1"}
        for name in args.configs:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--data", str(workdir)],
                                 capture_output=True, text=True, env=env, timeout=900)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                raise SystemExit(f"configuration {name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
            run = json.loads(line.removeprefix("RESULT "))
            runs.append(run)
            print(f"[{name}] decoded {run['decoded_mb']:.0f} MB in {run['decode_s']} s; store used "
                  f"{run['object_store_used_mb']:.0f} MB; driver peak {run['driver_peak_rss_mb']:.0f} MB, now "
                  f"{run['driver_after_drop_mb']['VmRSS']:.0f} MB; worker anon "
                  f"{run['worker_reading_all_pixels_mb']['RssAnon']:.0f} MB", flush=True)
        memory = psutil.virtual_memory()
        summary = {
            "benchmark": "decoded_memory",
            "command": "python benchmarks/decoded_memory.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                        "memory_total_gib": round(memory.total / 2**30, 1),
                        "python": platform.python_version(), "ray": ray.__version__},
            "dataset": generated,
            "what_is_measured": {
                "object_store_used_mb": "store_stats.object_store_bytes_used from the raylet's memory-info reply "
                                        "(ray._private.internal_api.get_memory_info_reply), after ray.put",
                "driver_*_mb": "/proc/self/status of the driver: VmRSS = RssAnon (private: decoded arrays) + "
                               "RssFile + RssShmem (object-store pages the driver wrote during ray.put)",
                "driver_peak_rss_mb": "resource.getrusage(RUSAGE_SELF).ru_maxrss of the child process "
                                      "(one per config)",
                "worker_reading_all_pixels_mb": "a Ray task that sums every pixel of ray.get(ref): its "
                                                "/proc/self/status",
            },
            "runs": runs,
            "header_estimate": header_estimates(workdir),
            "koniq10k_preflight": koniq_preflight(),
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
    finally:
        if not args.data:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
