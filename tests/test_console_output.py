"""The search's own console: the live trial table, Ray's chatter kept in files, progress bars.

The end-to-end check (a real search prints the table and none of Ray's per-checkpoint or Ray Data
lines) is in test_launch_scripts.py's smoke test of tune_ranking.py.
"""

from __future__ import annotations

import io
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest

from iqa_ray.core.selection import select_trial
from iqa_ray.search.console import TrialProgress, driver_log, quiet_console


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def trial(trial_id, status="RUNNING", epochs=10, **config):
    return SimpleNamespace(trial_id=trial_id, status=status, config={"epochs": epochs, **config}, last_result={},
                           error_file=None)


def report(progress, t, epoch, srcc, best_epoch=None, **extra):
    result = {"epoch": epoch, "best_epoch": epoch if best_epoch is None else best_epoch, "val_srcc": srcc,
              "val_plcc": srcc - 0.01, "lr_head": 1e-3 / epoch, "time_total_s": 2.0 * epoch, **extra}
    t.last_result = result
    progress.on_trial_result(0, [], t, result)


def progress_with(**kw):
    out, clock = io.StringIO(), Clock()
    return TrialProgress("val_srcc", "max", params=("alpha", "lr"), scheduler="asha", out=out, clock=clock, **kw), \
        out, clock


def test_table_is_printed_every_interval_and_only_when_something_changed():
    progress, out, clock = progress_with(every=30)
    progress.setup()
    a = trial("aaaa", alpha=0.25, lr=3e-4)
    trials = [a, trial("bbbb", status="PENDING", alpha=0.5, lr=1e-3)]
    report(progress, a, 1, 0.5)
    clock.now += 10
    progress.on_step_end(0, trials)
    assert out.getvalue() == ""  # not yet: 10 s < 30 s
    clock.now += 25
    progress.on_step_end(0, trials)
    first = out.getvalue()
    assert first.count("[search") == 1
    clock.now += 60
    progress.on_step_end(0, trials)
    assert out.getvalue() == first  # nothing new was reported: no second table
    report(progress, a, 2, 0.6)
    progress.on_step_end(0, trials)
    assert out.getvalue().count("[search") == 2


def test_table_shows_epoch_metrics_lr_time_params_and_the_summarys_selection():
    progress, out, clock = progress_with(every=0)
    progress.setup()
    a, b, c = trial("aaaa", alpha=0.25, lr=3e-4), trial("bbbb", alpha=0.5, lr=1e-3), trial("cccc", alpha=0.75, lr=2e-3)
    reports = {}
    # a: best epoch kept (0.70 at epoch 2, then lower); b: keeps its last epoch (0.65);
    # c: peaked at 0.9 but keeps its last epoch (0.4): selection judges the kept epoch, not the peak.
    for t, values, kept in ((a, [0.6, 0.7, 0.68], 2), (b, [0.5, 0.65], None), (c, [0.9, 0.4], None)):
        for epoch, value in enumerate(values, 1):
            best_epoch = min(kept, epoch) if kept else epoch
            report(progress, t, epoch, value, best_epoch=best_epoch)
            reports.setdefault(t.trial_id, []).append({"epoch": epoch, "best_epoch": best_epoch, "val_srcc": value})
    clock.now += 95
    progress.print_table([a, b, c])
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("[search 1 min 35 s] 3 trials: 3 running")
    expected = select_trial(reports, "val_srcc", "max")
    assert expected == "aaaa" and "selected so far: aaaa (val_srcc 0.7000@2)" in lines[0]
    header = lines[1].split()
    assert header[:8] == ["trial", "status", "epoch", "val_srcc", "val_plcc", "kept@epoch", "lr", "now"]
    assert header[-2:] == ["alpha", "lr"]
    row_a = next(line for line in lines if line.strip().startswith("aaaa")).split()
    assert row_a[:6] == ["aaaa", "running", "3/10", "0.6800", "0.6700", "0.7000@2"]
    assert row_a[6] == f"{1e-3 / 3:.2e}" and row_a[7:9] == ["6", "s"] and row_a[-2:] == ["0.250", "3.00e-04"]
    # Rows after the running ones are ordered by what selection compares; c's peak does not count.
    order = [line.split()[0] for line in lines[2:]]
    assert order == ["aaaa", "bbbb", "cccc"]


def test_finished_trials_say_why_they_ended(tmp_path):
    progress, out, _ = progress_with()
    done, cut, early = trial("done"), trial("cut"), trial("early")
    report(progress, done, 10, 0.7)
    report(progress, cut, 4, 0.6)
    report(progress, early, 6, 0.65, stopped_early=True)
    for t in (done, cut, early):
        t.status = "TERMINATED"
        progress.on_trial_complete(0, [], t)
    lines = out.getvalue().splitlines()
    assert lines[0] == "trial done finished at epoch 10/10: val_srcc 0.7000, kept 0.7000@10, 20 s"
    assert lines[1].startswith("trial cut stopped by asha at epoch 4/10")
    assert lines[2].startswith("trial early stopped early (no validation gain) at epoch 6/10")


def test_errors_show_the_exception_and_where_the_traceback_is(tmp_path):
    progress, out, _ = progress_with()
    broken = trial("bad")
    report(progress, broken, 3, 0.5)
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n")
    broken.error_file = str(error_file)
    broken.status = "ERROR"
    progress.on_trial_error(0, [], broken)
    assert out.getvalue().strip() == f"trial bad ERROR at epoch 3: RuntimeError: CUDA out of memory; traceback: {error_file}"


def test_many_trials_are_capped_and_counted():
    progress, out, _ = progress_with(max_rows=5)
    trials = []
    for k in range(12):
        t = trial(f"t{k:03d}", status="TERMINATED")
        report(progress, t, 10, 0.5 + k / 100)
        trials.append(t)
    progress.on_experiment_end(trials)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[search done")
    assert [line.split()[0] for line in lines[2:7]] == ["t011", "t010", "t009", "t008", "t007"]
    assert lines[7].strip() == "... 7 more trials (trials.parquet lists every one)"


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="progress interval must be >= 0"):
        TrialProgress(every=-1)


def test_driver_log_keeps_info_in_the_file_and_warnings_on_the_console(tmp_path):
    ray_logger = logging.getLogger("ray")
    console_stream = io.StringIO()
    console = logging.StreamHandler(console_stream)
    ray_logger.addHandler(console)
    saved_level = ray_logger.level
    (tmp_path / "exp").mkdir()
    try:
        with driver_log(tmp_path / "exp" / "driver.log") as path:
            logging.getLogger("ray.tune").info("Wrote the latest version of all result files")
            logging.getLogger("ray.tune").warning("a trial is slow")
            logging.getLogger("optuna").info("A new study created")
        logging.getLogger("ray.tune").info("after the search")
    finally:
        ray_logger.removeHandler(console)
        ray_logger.setLevel(saved_level)
    logged = path.read_text()
    assert "Wrote the latest version" in logged and "a trial is slow" in logged and "A new study created" in logged
    assert "after the search" not in logged
    on_console = console_stream.getvalue()
    assert "a trial is slow" in on_console and "Wrote the latest version" not in on_console
    assert "after the search" in on_console  # the console handler's level is restored
    assert console.level == logging.NOTSET


def test_a_launch_that_fails_early_leaves_no_experiment_folder_and_names_its_log(tmp_path, capsys):
    with pytest.raises(RuntimeError):
        with driver_log(tmp_path / "never-created" / "driver.log"):
            logging.getLogger("ray").info("Connecting to existing Ray cluster")
            raise RuntimeError("the cluster refused the token")
    assert not (tmp_path / "never-created").exists()
    err = capsys.readouterr().err
    kept = err.split("Ray's driver log of this run: ")[1].strip()
    assert "Connecting to existing Ray cluster" in open(kept).read()
    os.unlink(kept)


def test_quiet_console_selects_tunes_silent_engine_and_restores_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    with quiet_console(tmp_path / "driver.log"):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ


def test_ray_data_console_handler_is_quiet_inside_and_restored_after():
    import ray.data

    from iqa_ray.core.progress import quiet_ray_data

    logger = logging.getLogger("ray.data")
    consoles = [h for h in logger.handlers if h.name == "console"]
    files = [h for h in logger.handlers if h.name == "file"]
    assert consoles and files
    before = [h.level for h in logger.handlers]
    ctx = ray.data.DataContext.get_current()
    with quiet_ray_data():
        assert all(h.level >= logging.WARNING for h in consoles)
        assert [h.level for h in files] == [before[logger.handlers.index(h)] for h in files]  # file keeps all
        assert ctx.enable_progress_bars is False
    assert [h.level for h in logger.handlers] == before


def test_decoding_reports_each_image(tiny_dataset):
    from iqa_ray.data.catalog import generated_table
    from iqa_ray.data.decoded import decode_table

    table = generated_table(tiny_dataset.path).head(30)
    ticks = []
    decoded = decode_table(table, progress=ticks.append)
    assert ticks == [1] * len(table) and len(decoded.table) == len(table)


def test_feature_progress_counts_up_to_every_image_and_changes_nothing(tiny_dataset):
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.features import compute_features
    from iqa_ray.training.loaders import load_decoded

    config = TrainConfig.from_dict({
        "dataset": str(tiny_dataset.path), "crop_size": 32, "whole_image": True, "feature_cache": True,
        "family": "mlp", "pooling": "stages", "frozen_backbone": True, "pretrained": "offline"})
    decoded = load_decoded(config)
    seen = []
    with_progress = compute_features(decoded, config, progress=seen.append)
    plain = compute_features(decoded, config)
    n = len(decoded.table)
    assert seen == sorted(seen) and seen[-1] == n and len(seen) >= 2
    np.testing.assert_array_equal(with_progress.plain, plain.plain)
    np.testing.assert_array_equal(with_progress.flipped, plain.flipped)


def test_pregeneration_shows_one_bar_that_ends_at_every_image(tiny_config, tmp_path, capsys):
    from iqa_ray.data.pregenerate.run import pregenerate

    messages = []
    dataset = pregenerate(tiny_config, tmp_path, engine="local", progress=messages.append, progress_bar=True)
    err = capsys.readouterr().err
    n = dataset.stats["processed"]
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("pregenerate: generating: 100%") and f"{n}/{n}" in final, final
    assert "checking photos" in err and "calibrating" in err
    assert any(m.startswith("wrote ") for m in messages)  # messages still go to the caller
