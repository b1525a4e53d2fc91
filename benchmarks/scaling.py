#!/usr/bin/env python
"""Scaling shape: pre-generation and search throughput as the cluster's CPUs grow.

Layouts: one local Ray node of N CPUs (``--cpus 1 2``), and with ``--nodes 2`` also two Ray nodes
of one CPU each on this machine (a head and a worker node started by ``ray.cluster_utils.Cluster``,
Ray's own multi-node test cluster, each node with its own raylet and object store), so the cost
of spreading the same 2 CPUs over two nodes is measured against one 2-CPU node.

* Pre-generation: the embedded dataset (``--per-image`` versions per crop) on Ray Data over the
  whole cluster; images/s and CPU-seconds per image.
* Search: the same small ranking search (``--trials`` trials x ``--epochs`` epochs at 64 px, no
  early stopping) through the real launcher (one CPU per trial, so one trial per CPU runs at
  once); trials/hour and CPU-seconds per trial.

    python benchmarks/scaling.py [--cpus 1 2] [--nodes 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

OBJECT_STORE_BYTES = 512 * 1024**2  # per node of the two-node layout


@contextlib.contextmanager
def ray_cluster(nodes: int, cpus_per_node: int):
    """A running Ray cluster of ``nodes`` x ``cpus_per_node`` CPUs on this machine; yields its CPU count."""
    import ray

    if nodes == 1:
        ray.init(num_cpus=cpus_per_node, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        cluster = None
    else:
        from ray.cluster_utils import Cluster

        node_args = {"num_cpus": cpus_per_node, "num_gpus": 0, "object_store_memory": OBJECT_STORE_BYTES}
        cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(**node_args)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) != nodes:
            raise RuntimeError(f"asked for {nodes} Ray nodes, {len(alive)} are alive")
        yield int(ray.cluster_resources()["CPU"])
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def layout_name(nodes: int, cpus_per_node: int) -> str:
    return f"{nodes} node{'s' if nodes > 1 else ''} x {cpus_per_node} CPU"


def pregeneration(nodes: int, cpus_per_node: int, per_image: int) -> dict:
    import ray

    from iqa_ray.data.pregenerate.config import PregenConfig
    from iqa_ray.data.pregenerate.run import pregenerate

    with ray_cluster(nodes, cpus_per_node) as cpus:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            ds = pregenerate(PregenConfig(per_image=per_image), out, engine="ray")
            wall = time.perf_counter() - start
    n = ds.stats["processed"]
    return {"layout": layout_name(nodes, cpus_per_node), "nodes": nodes, "cpus": cpus, "images": n,
            "wall_s": round(wall, 1), "images_per_s": round(n / wall, 1), "cpu_s_per_image": round(cpus * wall / n, 4)}


def search(nodes: int, cpus_per_node: int, trials: int, epochs: int) -> dict:
    from iqa_ray.cli.tune import main as launch

    name = f"scale{nodes}x{cpus_per_node}"
    with ray_cluster(nodes, cpus_per_node) as cpus, tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        code = launch(["--num-samples", str(trials), "--max-epochs", str(epochs), "--trial-scheduler", "none",
                       "--searcher", "random", "--cpus-per-trial", "1", "--set", "crop_size=64",
                       "--set", "eval_patches=1", "--storage", storage, "--name", name], study="ranking")
        wall = time.perf_counter() - start
        trials_table = pd.read_parquet(Path(storage) / name / "trials.parquet") if code == 0 else pd.DataFrame()
    done = len(trials_table)
    per_node = trials_table["node_id"].value_counts().tolist() if "node_id" in trials_table else []
    return {"layout": layout_name(nodes, cpus_per_node), "nodes": nodes, "cpus": cpus, "trials": done,
            "trials_per_node": sorted(per_node, reverse=True), "wall_s": round(wall, 1),
            "trials_per_hour": round(done / wall * 3600, 1), "cpu_s_per_trial": round(cpus * wall / max(done, 1), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="CPUs of the one-node layouts")
    p.add_argument("--nodes", type=int, nargs="+", default=[1], choices=[1, 2],
                   help="1: the one-node layouts of --cpus; 2: also two nodes x 1 CPU on this machine")
    p.add_argument("--per-image", type=int, default=10)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    layouts = [(1, c) for c in args.cpus] if 1 in args.nodes else []
    layouts += [(2, 1)] if 2 in args.nodes else []
    result = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "pregeneration": [pregeneration(n, c, args.per_image) for n, c in layouts],
              "search": [search(n, c, args.trials, args.epochs) for n, c in layouts]}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
