"""Flag and resource checks that must fail before Ray starts or any trial runs."""

import argparse
import time

import pytest

from iqa_ray.cli.tune import build_parser, main
from iqa_ray.core.errors import LaunchError
from iqa_ray.search.cluster import check_address
from iqa_ray.search.settings import per_gpu, resolve_gpus, settings_from_args
from iqa_ray.training.config import TrainConfig


def parse(*argv, study="ranking"):
    return build_parser(study).parse_args(list(argv))


def test_help_lists_the_flags_users_need():
    text = build_parser("ranking").format_help()
    for flag in ("--gpus", "--gpus-per-trial", "--cpus-per-trial", "--num-samples", "--max-concurrent", "--searcher",
                 "--trial-scheduler", "--dataset", "--address", "--storage", "--name", "--resume", "--smoke-test",
                 "--grace-period", "--reduction-factor", "--max-epochs", "--progress-every", "--verbose", "--mlflow"):
        assert flag in text


def test_defaults_come_from_the_study():
    s = settings_from_args(parse(), "ranking")
    assert (s.searcher, s.scheduler) == ("optuna", "asha")
    assert s.num_samples == s.study.num_samples and s.max_epochs == s.study.max_epochs
    assert s.gpus_per_trial == 0.0 and s.cpus_per_trial == 1.0
    # the ranking study runs on the human-rated photos that ship with the repository; the gmm study,
    # whose clusters need the synthetic distortions, on the embedded dataset
    assert dict(s.overrides)["dataset"] == "livec"
    assert dict(settings_from_args(parse(), "gmm").overrides)["dataset"] == "embedded"
    smoke = settings_from_args(parse("--smoke-test"), "ranking")
    assert smoke.num_samples == 2 and smoke.max_epochs == 1
    assert dict(smoke.overrides)["dataset"] == "embedded"  # a minute's run: a quarter of the embedded dataset
    assert dict(settings_from_args(parse("--dataset", "embedded"), "ranking").overrides)["dataset"] == "embedded"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--gpus-per-trial", "1.5"], "must be in \\(0, 1\\]"),
        (["--gpus-per-trial", "0.3"], "does not divide a GPU"),
        (["--gpus", "0", "--gpus-per-trial", "0.5"], "--gpus 0"),
        (["--gpus", "-1"], "--gpus must be >= 0"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--reduction-factor", "1"], "--reduction-factor must be >= 2"),
        (["--resume"], "--resume needs --name"),
        (["--set", "alpha=2"], "alpha must be in \\[0, 1\\]"),
        (["--set", "margin=-1"], "margin must be >= 0"),
        (["--set", "backbone=resnet9000"], "unknown backbone"),
        (["--set", "alpha=0.3"], "--set alpha: searched by study 'ranking'"),
        (["--name", "../../etc"], "must match"),
        (["--max-epochs", "1", "--grace-period", "2"], "grace_period \\(2\\) exceeds max_epochs"),
    ],
)
def test_bad_flags_are_rejected_with_what_is_valid(argv, match, capsys):
    assert main(argv, study="ranking") == 2
    import re

    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("value", ["-5", "soon", "nan", "inf"])
def test_bad_progress_interval_names_what_is_valid(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("--progress-every", value)
    assert exit_.value.code == 2
    assert f"--progress-every: expected a number of seconds >= 0, e.g. 30, got '{value}'" in capsys.readouterr().err


def test_console_flags_choose_our_table_or_rays_console():
    from iqa_ray.search.console import DeviceNote, TrialProgress, console_callbacks
    from iqa_ray.search.tuner import run_config

    quiet = settings_from_args(parse("--progress-every", "5"), "ranking")
    table, note = console_callbacks(quiet)
    assert isinstance(table, TrialProgress) and table.every == 5.0 and table.metric == quiet.study.metric
    assert table.params == tuple(p.name for p in quiet.effective_study.params) and table.scheduler == "asha"
    config = run_config(quiet, [table])
    assert config.verbose == 0 and config.callbacks[0] is table
    verbose = settings_from_args(parse("--verbose"), "ranking")
    # Ray's console, and still the one note on GPU shares without CUDA
    (only,) = console_callbacks(verbose)
    assert isinstance(note, DeviceNote) and isinstance(only, DeviceNote) and run_config(verbose, None).verbose == 1
    assert settings_from_args(parse(), "ranking").progress_every == 30.0


def test_unknown_study_is_rejected(capsys):
    assert main(["--study", "nope"]) == 2
    assert "available:" in capsys.readouterr().err


def test_more_gpus_than_the_cluster_has_is_an_error_not_a_hang():
    with pytest.raises(LaunchError, match="more GPUs than the Ray cluster has \\(0\\)"):
        resolve_gpus(argparse.Namespace(gpus=4, gpus_per_trial=None), {"CPU": 2.0})
    with pytest.raises(LaunchError, match="more GPUs than the Ray cluster has \\(2\\)"):
        resolve_gpus(argparse.Namespace(gpus=4, gpus_per_trial=None), {"CPU": 8.0, "GPU": 2.0})
    assert resolve_gpus(argparse.Namespace(gpus=None, gpus_per_trial=None), {"CPU": 2.0}) == (0.0, 0.0)
    assert resolve_gpus(argparse.Namespace(gpus=None, gpus_per_trial=None), {"GPU": 4.0}) == (4.0, 0.25)
    assert resolve_gpus(argparse.Namespace(gpus=2, gpus_per_trial=0.5), {"GPU": 4.0}) == (2.0, 0.5)


def test_gpu_shares():
    assert [per_gpu(x) for x in (1, 0.5, 0.25, 0.2)] == [1, 2, 4, 5]


def test_unreachable_address_fails_within_a_bounded_time():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="no Ray cluster answers"):
        check_address("127.0.0.1:9", timeout=3)  # the discard port: nothing listens
    with pytest.raises(LaunchError, match="no Ray cluster answers"):
        check_address("192.0.2.1:6379", timeout=2)  # TEST-NET-1: never routed
    assert time.monotonic() - start < 10
    with pytest.raises(LaunchError, match="HOST:PORT"):
        check_address("not-an-address")


def test_resume_of_an_unknown_experiment_is_a_clear_error(tmp_path, capsys):
    from iqa_ray.search.study import StudyError

    # Refused while the flags are read: before Ray starts and before any image is decoded.
    with pytest.raises(StudyError, match="no experiment named 'never-ran'"):
        settings_from_args(parse("--name", "never-ran", "--storage", str(tmp_path), "--resume"), "ranking")
    assert main(["--name", "never-ran", "--storage", str(tmp_path), "--resume"], study="ranking") == 2
    assert "no experiment named 'never-ran'" in capsys.readouterr().err


def _started(tmp_path, *argv, study="ranking"):
    """Record an experiment as the launcher does when a search starts; return its settings."""
    from dataclasses import replace

    from iqa_ray.search.run import write_experiment_info

    if "--dataset" not in argv:  # an experiment on the embedded dataset, whose folder is recorded below
        argv = ("--dataset", "embedded", *argv)
    args = parse("--name", "exp", "--storage", str(tmp_path), *argv, study=study)
    settings = settings_from_args(args, study)
    # run_search records the dataset the trials read (for embedded, the generated folder).
    overrides = {**dict(settings.overrides), "dataset": str(tmp_path / "generated-folder")}
    write_experiment_info(replace(settings, overrides=tuple(sorted(overrides.items()))), args)
    return settings


def test_resume_continues_the_recorded_study_dataset_and_sets(tmp_path):
    started = _started(tmp_path, "--set", "crop_size=96", "--num-samples", "3", "--max-epochs", "2",
                       "--grace-period", "1", "--searcher", "random")
    # Nothing but resources on the command line: the recorded spec is used, resources may change.
    resumed = settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--resume",
                                       "--max-concurrent", "1", "--cpus-per-trial", "2"), "ranking")
    assert dict(resumed.overrides) == {"crop_size": 96, "dataset": str(tmp_path / "generated-folder")}
    assert (resumed.searcher, resumed.num_samples, resumed.max_epochs) == ("random", 3, 2)
    assert (resumed.max_concurrent, resumed.cpus_per_trial) == (1, 2.0)
    assert resumed.study.definition == started.study.definition
    # Repeating the original flags is fine too.
    again = settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--resume", "--dataset", "embedded",
                                     "--set", "crop_size=96", "--searcher", "random"), "ranking")
    assert dict(again.overrides) == dict(resumed.overrides)


@pytest.mark.parametrize("argv, named", [
    (["--dataset", "livec:/data/livec"], "--dataset (livec:/data/livec now, embedded recorded)"),
    (["--set", "crop_size=64"], "--set crop_size"),
    (["--set", "crop_size=96", "--set", "lr=0.1"], "--set lr"),
    (["--num-samples", "5"], "--num-samples (5 now, 3 recorded)"),
    (["--smoke-test"], "--smoke-test"),
])
def test_resume_that_would_change_the_experiment_is_refused_naming_the_keys(tmp_path, argv, named):
    _started(tmp_path, "--set", "crop_size=96", "--num-samples", "3")
    with pytest.raises(LaunchError, match="would not continue the experiment") as info:
        settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--resume", *argv), "ranking")
    assert named in str(info.value)


def test_resume_under_another_study_is_refused(tmp_path):
    _started(tmp_path, study="gmm")
    with pytest.raises(LaunchError, match="study \\(ranking now, gmm recorded\\)"):
        settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--resume"), "ranking")


def test_trial_folders_are_named_from_ids_not_config_values():
    from types import SimpleNamespace

    from iqa_ray.search.tuner import trial_dirname

    trial = SimpleNamespace(trial_id="ab12", config={"dataset": "../../etc", "backbone": "/abs"})
    assert trial_dirname(trial) == "trial_ab12"


def test_gpus_flag_caps_concurrency_and_shares_need_a_gpu():
    from iqa_ray.search.cluster import check_cpus_per_trial, gpu_concurrency

    assert gpu_concurrency(4, 0.25, None) == 16
    assert gpu_concurrency(1, 0.25, 2) == 2
    assert gpu_concurrency(2, 0.5, None) == 4
    assert gpu_concurrency(0, 0.0, None) is None
    with pytest.raises(LaunchError, match="no GPU"):
        resolve_gpus(argparse.Namespace(gpus=None, gpus_per_trial=0.5), {"CPU": 2.0})
    with pytest.raises(LaunchError, match="largest node's 1 CPUs"):
        check_cpus_per_trial(2, [1.0, 1.0])
    check_cpus_per_trial(1, [1.0, 1.0])


def test_a_study_that_needs_hub_weights_fails_at_once_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert main(["--smoke-test"], study="backbone") == 2
    err = capsys.readouterr().err
    assert "not reachable" in err and "--set pretrained=none" in err
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_bad_time_budget_names_what_is_valid(value, capsys):
    with pytest.raises(SystemExit):
        parse("--time-budget", value)
    assert f"--time-budget: expected a number of minutes > 0, e.g. 30, got '{value}'" in capsys.readouterr().err


def test_a_time_budget_reaches_tune_and_the_record_and_a_resume_keeps_it(tmp_path):
    from iqa_ray.search.tuner import build_tuner

    settings = _started(tmp_path, "--time-budget", "1.5", "--num-samples", "3")
    assert settings.time_budget == 1.5
    tuner = build_tuner(settings, lambda config: None)
    assert tuner._local_tuner._tune_config.time_budget_s == 90.0
    unbudgeted = settings_from_args(parse("--storage", str(tmp_path / "other")), "ranking")  # not the repo's results/
    assert build_tuner(unbudgeted, lambda config: None)._local_tuner._tune_config.time_budget_s is None
    resumed = settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--resume"), "ranking")
    assert resumed.time_budget == 1.5
    with pytest.raises(LaunchError, match=r"--time-budget \(5.0 now, 1.5 recorded\)"):
        settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--resume", "--time-budget", "5"),
                           "ranking")


def test_trials_reuse_their_actors_unless_the_cluster_has_several_nodes(tmp_path):
    from dataclasses import replace

    from iqa_ray.search.tuner import build_tuner

    settings = settings_from_args(parse("--storage", str(tmp_path)), "ranking")
    assert build_tuner(settings, lambda config: None)._local_tuner._tune_config.reuse_actors is True
    several = replace(settings, reuse_actors=False)  # what the search sets on a cluster of several nodes
    assert build_tuner(several, lambda config: None)._local_tuner._tune_config.reuse_actors is False


def test_select_flag_overrides_the_studys_rule_and_survives_a_resume(tmp_path, capsys):
    settings = _started(tmp_path, "--select", "latency_ms<=30", study="efficiency")
    assert settings.study.selection_rule.budgets == (("latency_ms", 30.0),)
    assert settings_from_args(parse(study="efficiency"), "efficiency").study.select == "knee"
    resumed = settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--resume", study="efficiency"),
                                 "efficiency")
    assert resumed.study.select == "latency_ms<=30"
    # the rule only picks among finished trials: a resume may change it
    changed = settings_from_args(parse("--name", "exp", "--storage", str(tmp_path), "--resume", "--select", "best",
                                       study="efficiency"), "efficiency")
    assert changed.study.select == "best"
    assert main(["--select", "fastest"], study="efficiency") == 2
    assert "selection rule 'fastest' is not valid" in capsys.readouterr().err


def test_ended_by_names_the_time_budget_only_where_the_scheduler_cannot_stop(tmp_path):
    import json

    from iqa_ray.search.export import ended_by, _experiment_info, _scheduler_stops

    (tmp_path / "experiment.json").write_text(json.dumps({"scheduler": "asha", "grace_period": 1, "reduction_factor": 2,
                                                          "max_epochs": 8, "time_budget": 10}))
    stops = _scheduler_stops(_experiment_info(tmp_path))
    assert stops == (frozenset({1, 2, 4}), True)
    assert ended_by("TERMINATED", None, {"epoch": 4}, 8, stops) == "scheduler"
    assert ended_by("TERMINATED", None, {"epoch": 3}, 8, stops) == "time_budget"
    assert ended_by("TERMINATED", None, {"epoch": 8}, 8, stops) == "completed"
    assert ended_by("TERMINATED", None, {"epoch": 3}, 8, (frozenset({1, 2, 4}), False)) == "scheduler"


def test_an_old_key_in_set_overrides_the_studys_value_written_with_the_new_one():
    # ranking.toml fixes lr_schedule = "cosine"; --set scheduler=step is the same key by its old name
    with pytest.warns(FutureWarning, match="--set: the key 'scheduler' is deprecated, use 'lr_schedule'"):
        settings = settings_from_args(parse("--set", "scheduler=step", "--recipe", "none"), "ranking")
    assert dict(settings.overrides)["lr_schedule"] == "step" and "scheduler" not in dict(settings.overrides)


def test_set_is_parsed_once_so_an_old_key_warns_once(tmp_path):
    import json
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # every warning, even a repeat from the same line
        _started(tmp_path, "--set", "scheduler=step", "--recipe", "none")
    deprecations = [w for w in seen if "the key 'scheduler' is deprecated" in str(w.message)]
    assert len(deprecations) == 1, [str(w.message) for w in deprecations]
    record = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    assert record["launch"]["set"] == {"lr_schedule": "step"}  # what --resume compares, by the key's new name


def test_set_family_drops_the_studys_keys_of_another_family_and_says_so():
    # ranking.toml is written for hyperiqa and fixes its multiscale; an mlp search drops it, aloud
    settings = settings_from_args(parse("--set", "family=mlp", "--set", "hidden_dim=64", "--recipe", "none"), "ranking")
    assert "multiscale" not in settings.study.fixed
    assert any("--set family=mlp: the study's fixed multiscale = " in line and "dropped" in line
               for line in settings.recipe_lines), settings.recipe_lines
    assert TrainConfig.from_dict({**settings.study.fixed, **dict(settings.overrides)}).model.hidden_dim == 64
    # a study that searches another family's keys cannot be switched
    with pytest.raises(LaunchError, match="--set family=mlp: study 'gmm' searches .*n_clusters.*which family 'mlp' "
                                          "does not take"):
        settings_from_args(parse("--set", "family=mlp", "--recipe", "none", study="gmm"), "gmm")
