"""The launcher on an existing Ray cluster: a head and a worker node started with ``ray start`` here.

Both nodes run on this machine with their own temp folder and their own ports, 1 CPU each, so two
trials of 1 CPU can only run at the same time on different nodes. The nodes use token
authentication with a token of their own (Ray 2.60 turns it on for ``ray start --head`` whenever
``~/.ray/auth_token`` exists, so the test sets it explicitly rather than depend on that file).

Teardown never runs ``ray stop``: that command kills every Ray process on the machine, other
people's clusters included. Each ``ray start`` runs in a new session, so its daemons share one
process group; teardown stops exactly those processes and their children (Ray's worker processes
move to process groups of their own but stay children of the raylet).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "tune_ranking.py"
RAY = Path(sys.executable).with_name("ray")

START_TIMEOUT_S = 120  # one `ray start`
QUERY_TIMEOUT_S = 90  # one short-lived driver that lists the nodes
LAUNCH_TIMEOUT_S = 600  # the whole search (about 60 s on an idle 2-core machine)
STOP_GRACE_S = 10  # SIGTERM -> SIGKILL, per step of the teardown
WORKER_PORTS = 100  # ports per node for Ray's worker processes
OBJECT_STORE_BYTES = 256 * 1024**2


# --- processes and ports ---------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free on every interface right now (Ray binds to all of them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_range(n: int, avoid: set[int]) -> tuple[int, int]:
    """An inclusive range of ``n`` free ports below Linux's ephemeral range (32768+) and above the
    10002-19999 that ``ray start`` uses by default, so neither the OS nor another cluster picks them."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 32000 - n)
        ports = range(lo, lo + n)
        if avoid.intersection(ports):
            continue
        socks = []
        try:
            for port in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return lo, lo + n - 1
    raise RuntimeError(f"no {n} consecutive free ports between 20000 and 32000")


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _with_children(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = {p.pid: p for p in procs}
    for proc in procs:
        try:
            out.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(out.values())


def _terminate(procs: list[psutil.Process], grace: float = STOP_GRACE_S) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _stop_node(pgid: int) -> None:
    """Stop the processes one ``ray start`` left behind, in ``ray stop``'s order: the raylet with its
    workers and agents first, then the rest (GCS last would be ``ray stop``'s order too)."""
    members = _group_members(pgid)
    raylets = [p for p in members if _name(p) == "raylet"]
    _terminate(_with_children(raylets))
    rest = _group_members(pgid)
    gcs = [p for p in rest if _name(p) == "gcs_server"]
    _terminate(_with_children([p for p in rest if p not in gcs]))
    _terminate(_with_children(gcs + _group_members(pgid)))


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


# --- the cluster -----------------------------------------------------------------------------------


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    node_ids: list[str]
    root: Path
    data: Path
    head_node_id: str
    commands: list[list[str]] = field(default_factory=list)


_LIST_NODES = """
import json, sys, time
import ray
address, want, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
deadline = time.monotonic() + wait_s
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps([{"node_id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0.0),
                   "head": "node:__internal_head__" in n["Resources"]} for n in alive]))
ray.shutdown()
"""


def list_nodes(address: str, env: dict[str, str], want: int = 2, wait_s: float = 30) -> list[dict]:
    """The cluster's alive nodes, from a short-lived driver in its own process."""
    out = subprocess.run([sys.executable, "-c", _LIST_NODES, address, str(want), str(wait_s)], env=env,
                         capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    assert out.returncode == 0, f"could not list the nodes of {address}:\n{out.stderr[-3000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> tuple[int, int]:
    """Run ``ray start ARGS`` in a new session; (its process group, exit code)."""
    with open(log, "a") as fh:
        fh.write(f"$ ray start {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.Popen([str(RAY), "start", *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.pid, proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.pid, -1


def _node_args(temp_dir: Path, ports: list[int], workers: tuple[int, int], cpus: int = 1, gpus: int = 0) -> list[str]:
    node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics = ports
    return [
        "--num-cpus", str(cpus), "--num-gpus", str(gpus), "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1",
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--min-worker-port", str(workers[0]), "--max-worker-port", str(workers[1]),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats",
    ]


def _start_with_retry(make_args, env: dict[str, str], log: Path, groups: list[int], attempts: int = 2) -> list[str]:
    """Free ports are picked a moment before Ray binds them; if another process takes one in
    between, ``ray start`` fails: stop what it left and try once more with new ports."""
    for attempt in range(attempts):
        args = make_args()
        pgid, rc = _ray_start(args, env, log)
        groups.append(pgid)
        if rc == 0:
            return args
        _stop_node(pgid)
        groups.remove(pgid)
    pytest.fail(f"`ray start` failed {attempts} times; log:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def running_cluster(data: Path, nodes: list[tuple[int, int]]) -> Iterator[Cluster]:
    """A cluster of ``nodes`` (each ``(CPUs, GPUs)``, the head first) started with ``ray start`` on this
    machine, with token authentication; stopped (without ``ray stop``) on exit. The GPUs are logical:
    Ray lets a node declare GPUs it does not have."""
    # Short root: Ray puts Unix sockets under <temp-dir>/session_<date>_<pid>/sockets/ and a socket
    # path must fit in 107 bytes, which pytest's tmp_path may exceed.
    root = Path(tempfile.mkdtemp(prefix="iqa-rc-", dir="/tmp" if os.path.isdir("/tmp") else None))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), IQA_RAY_DATA=str(data))
    log = root / "ray-start.log"
    groups: list[int] = []
    state: dict[str, int] = {}
    taken: set[int] = set()  # the worker ports of the nodes started so far

    def head_args(cpus: int, gpus: int) -> list[str]:
        gcs, dashboard, client, *node = _free_ports(9)
        state["gcs"] = gcs
        workers = _free_range(WORKER_PORTS, {gcs, dashboard, client, *node})
        return ["--head", "--port", str(gcs), "--include-dashboard=false", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
                *_node_args(root / "head", node, workers, cpus, gpus)]

    def worker_args(index: int, cpus: int, gpus: int) -> list[str]:
        node = _free_ports(6)
        workers = _free_range(WORKER_PORTS, {*node, *taken})
        return ["--address", f"127.0.0.1:{state['gcs']}",
                *_node_args(root / f"worker{index or ''}", node, workers, cpus, gpus)]

    try:
        commands = []
        for index, (cpus, gpus) in enumerate(nodes):
            make = (lambda c=cpus, g=gpus: head_args(c, g)) if index == 0 else (
                lambda i=index - 1, c=cpus, g=gpus: worker_args(i, c, g))
            args = _start_with_retry(make, env, log, groups)
            low, high = int(args[args.index("--min-worker-port") + 1]), int(args[args.index("--max-worker-port") + 1])
            taken.update(range(low, high + 1))
            commands.append(["ray", "start", *args])
        address = f"127.0.0.1:{state['gcs']}"
        listed = list_nodes(address, env, want=len(nodes))
        assert len(listed) == len(nodes) and sorted(n["cpus"] for n in listed) == sorted(float(c) for c, _ in nodes), listed
        yield Cluster(address=address, env=env, node_ids=sorted(n["node_id"] for n in listed), root=root, data=data,
                      head_node_id=next(n["node_id"] for n in listed if n["head"]), commands=commands)
    finally:
        for pgid in reversed(groups):  # the worker nodes first, then the head
            _stop_node(pgid)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # IQA_RAY_DATA: one filesystem that both nodes see
    with running_cluster(tmp_path_factory.mktemp("shared-data"), [(1, 0), (1, 0)]) as started:
        yield started


def _launch(*argv: str, env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(LAUNCHER), *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    return proc, time.monotonic() - start


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 300)
def test_launcher_runs_trials_on_both_nodes_of_an_existing_cluster(cluster, tmp_path):
    import pandas as pd

    storage = tmp_path / "results"
    argv = ("--address", cluster.address, "--smoke-test", "--num-samples", "2", "--max-epochs", "1",
            "--cpus-per-trial", "1", "--gpus", "0", "--storage", str(storage), "--name", "two-nodes")
    proc, elapsed = _launch(*argv, env=cluster.env, timeout=LAUNCH_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    (tmp_path / "launcher.log").write_text(output)
    assert proc.returncode == 0, output[-6000:]
    assert "(cluster: 2 CPU, 0 GPU)" in output

    experiment = storage / "two-nodes"
    driver_log = (experiment / "driver.log").read_text()  # Ray's INFO lines, kept off the console
    assert "Connecting to existing Ray cluster" in driver_log
    assert "Started a local Ray instance" not in driver_log + output
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert (trials["status"] == "TERMINATED").all(), trials[["trial_id", "kind", "status", "error"]]
    trials = trials[trials["kind"] == "search"]  # (the cpu recipe's refit of the selected config is the third)
    assert len(trials) == 2
    # 1 CPU per node and 1 CPU per trial: the two trials ran at once, one on each node.
    assert trials["node_id"].nunique() == 2, trials[["trial_id", "node_id"]]
    assert sorted(trials["node_id"]) == cluster.node_ids
    epochs = pd.read_parquet(experiment / "epochs.parquet")
    assert sorted(epochs["node_id"].unique()) == cluster.node_ids
    # pre-generation wrote under IQA_RAY_DATA, the folder every node sees
    assert list(cluster.data.glob("*/manifest.json"))

    # The launcher connected to someone else's cluster: it must leave it running.
    after = list_nodes(cluster.address, cluster.env, want=2, wait_s=5)
    assert sorted(n["node_id"] for n in after) == cluster.node_ids
    worker_id = next(n for n in cluster.node_ids if n != cluster.head_node_id)
    print(f"\n[cluster] launcher exit 0 in {elapsed:.1f} s; head node {cluster.head_node_id}, worker node {worker_id}; "
          f"trials per node {trials['node_id'].value_counts().to_dict()}")
    for cmd in cluster.commands:
        print("[cluster] " + " ".join(cmd))
    print("[cluster] " + " ".join(["python", "launch/tune_ranking.py", *argv]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launcher_without_the_cluster_token_fails_with_a_clear_message(cluster, tmp_path):
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["RAY_AUTH_MODE"] = "disabled"
    proc, elapsed = _launch("--address", cluster.address, "--smoke-test", "--storage", str(tmp_path), "--name", "x",
                            env=env, timeout=240)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    assert "requires token authentication" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
    assert sorted(n["node_id"] for n in list_nodes(cluster.address, cluster.env, wait_s=5)) == cluster.node_ids


@pytest.mark.timeout(120)
def test_address_with_nothing_listening_fails_fast_without_starting_ray(tmp_path):
    (port,) = _free_ports(1)  # free a moment ago: nothing listens there
    ray_tmp = tmp_path / "ray-tmp"  # where a local Ray instance would put its session
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    proc, elapsed = _launch("--address", f"127.0.0.1:{port}", "--smoke-test", "--storage", str(tmp_path / "results"),
                            "--name", "nowhere", env=env, timeout=90)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    assert f"error: --address 127.0.0.1:{port}: no Ray cluster answers there" in proc.stderr
    assert f"ray start --head --port {port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    # connection refused is immediate; the rest is Python start-up (torch import) on a busy machine
    assert elapsed < 60
    assert not ray_tmp.exists() and not (tmp_path / "results").exists()
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_connection_failures_say_what_to_do():
    from iqa_ray.search.cluster import _connection_hint

    def chained(message: str) -> ConnectionError:
        try:
            try:
                raise RuntimeError(message)
            except RuntimeError as inner:
                raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from inner
        except ConnectionError as exc:
            return exc

    auth = _connection_hint("10.0.0.5:6379", chained("RPC error: InvalidAuthToken: Authentication token is missing"))
    assert "requires token authentication" in auth and "RAY_AUTH_MODE=token" in auth
    other = _connection_hint("10.0.0.5:6379", chained("Failed to connect to GCS"))
    assert "could not connect to the Ray cluster at 10.0.0.5:6379" in other and "ray status --address" in other
