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
