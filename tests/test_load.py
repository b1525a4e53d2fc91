import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_two_hundred_short_trials_finish_with_bounded_driver_memory_and_nothing_left(tmp_path):
    import ray
    from load_trials import run

    ray.shutdown()  # the end-to-end tests' shared instance (conftest.py): this test starts and counts its own
    result = run(200, str(tmp_path))
    assert result["finished"] == 200 and result["errored"] == 0
    rss = {int(k): v for k, v in result["driver_rss_mb"].items()}
    assert 20 in rss and 200 in rss
    # Tune keeps a small record per trial; growth must stay far from linear-in-checkpoints leaks.
    assert rss[200] - rss[20] < 150, rss
    assert result["placement_groups_left"] == 0
    assert result["ray_processes_left"] == []
