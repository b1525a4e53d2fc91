"""The test suite's own guard: ``in_process`` tests may start neither Ray nor a subprocess."""

from __future__ import annotations

import subprocess

import pytest


@pytest.mark.in_process
def test_an_in_process_test_cannot_start_ray_or_a_subprocess():
    import ray

    with pytest.raises(AssertionError, match="marked in_process but starts Ray"):
        ray.init(num_cpus=1)
    assert not ray.is_initialized()
    with pytest.raises(AssertionError, match="marked in_process but starts a subprocess"):
        subprocess.run(["true"], check=True)
    with pytest.raises(AssertionError, match="marked in_process but starts a subprocess"):
        subprocess.run("python -c 'import ray'", shell=True, check=True)
    # git is let through: a run records its code's revision
    assert subprocess.run(["git", "--version"], capture_output=True, check=True).returncode == 0


def test_other_tests_may_start_a_subprocess():
    assert subprocess.run(["true"], check=True).returncode == 0


E2E_PROBE = '''
import os
import pytest

@pytest.mark.slow
@pytest.mark.parametrize("i", range(6))
def test_end_to_end(i):
    with open(os.path.join(os.environ["PROBE_DIR"], f"e2e-{i}"), "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])

@pytest.mark.slow
@pytest.mark.in_process
@pytest.mark.parametrize("i", range(6))
def test_in_process(i):
    pass

@pytest.mark.parametrize("i", range(12))
def test_fast(i):
    pass
'''


def test_the_end_to_end_tests_run_on_one_worker_under_make_test(tmp_path):
    """`make test`'s xdist options keep every slow test that is not ``in_process`` on one worker
    (``--dist loadgroup`` and the group this conftest gives them): two at once would share the cores
    that each sizes its Ray instance to."""
    import os
    import shutil
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(E2E_PROBE)
    base = tmp_path / "base"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                           "-n", "2", "--dist", "loadgroup", "--basetemp", str(base), "-c", "/dev/null",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PROBE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    workers = {path.read_text() for path in tmp_path.glob("e2e-*")}
    assert len(list(tmp_path.glob("e2e-*"))) == 6 and len(workers) == 1, workers


def test_plain_pytest_runs_the_fast_tests_on_a_worker_per_cpu_a_module_on_one(tmp_path):
    """Plain ``pytest`` (the repository's pytest options, nothing on the command line) skips the
    slow tests and spreads the others over xdist workers, one per CPU (capped by conftest.py), a
    module's tests on one worker (its module fixtures built once)."""
    import os
    import shutil
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    probes = []
    for module in ("a", "b"):
        probes.append(tmp_path / f"test_probe_{module}.py")
        probes[-1].write_text(E2E_PROBE.replace(
            "def test_fast(i):\n    pass",
            "def test_fast(i):\n"
            f"    with open(os.path.join(os.environ[\"PROBE_DIR\"], f\"fast-{module}-{{i}}\"), \"w\") as f:\n"
            "        f.write(os.environ.get(\"PYTEST_XDIST_WORKER\", \"none\") + \" of \" +"
            " os.environ.get(\"PYTEST_XDIST_WORKER_COUNT\", \"none\"))"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "base"), *map(str, probes)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PROBE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert not list(tmp_path.glob("e2e-*")), "plain pytest ran a slow test"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for module in ("a", "b"):
        seen = [path.read_text().split(" of ") for path in tmp_path.glob(f"fast-{module}-*")]
        assert len(seen) == 12 and all("none" not in pair for pair in seen), seen
        assert {count for _, count in seen} == {str(min(cpus, 8))}, seen  # 8: conftest.MAX_AUTO_WORKERS
        assert len({worker for worker, _ in seen}) == 1, seen
