"""The search's phase timer: what summary.json's ``phases`` and ``total_s`` and the console's
``time:`` line hold."""

import time

import pytest

from iqa_ray.search.phases import PHASES, Phases, describe


def test_phases_are_timed_added_up_and_recorded_in_run_order():
    phases = Phases()
    with phases("search"):
        time.sleep(0.05)
    with phases("startup"):
        time.sleep(0.02)
    with phases("search"):  # a phase that runs twice counts both times
        time.sleep(0.05)
    record = phases.record()
    assert list(record) == ["startup", "search"]  # PHASES order, only those that ran
    assert record["search"] >= 0.1 and 0.0 <= record["startup"] < record["search"]
    assert phases.total() >= 0.12


def test_a_phase_that_raises_is_still_timed_and_the_error_passes():
    phases = Phases()
    with pytest.raises(RuntimeError, match="boom"), phases("refit"):
        raise RuntimeError("boom")
    assert "refit" in phases.record()


def test_an_unknown_phase_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown phase 'warmup'.*startup, decoding"):
        with Phases()("warmup"):
            pass
    assert PHASES[0] == "startup" and PHASES[-1] == "report"


def test_describe_prints_each_phase_and_the_total():
    assert describe({"startup": 6.2, "search": 60.0}, 70.4) == "time: startup 6 s, search 60 s; total 70 s"
