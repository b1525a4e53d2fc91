"""Ensembles a search hands back (issue 36): greedy selection over the trials' validation
predictions, the predictions the trials record, and the averaged model (load_model, score, export)."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iqa_ray.core.ensembles import caruana_select, ensemble_predictions
from iqa_ray.core.metrics import srcc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def library(n_trials=5, n_photos=40, seed=0):
    """Trials whose predictions are MOS plus noise of different strengths and kinds."""
    rng = np.random.default_rng(seed)
    mos = rng.uniform(0, 100, n_photos)
    preds = {f"t{i:02d}": mos + rng.normal(0, 15 + 10 * i, n_photos) + 30 * np.sin(mos / (7 + i)) for i in range(n_trials)}
    return preds, mos


def test_the_first_round_takes_the_best_single_trial_alone():
    preds, mos = library()
    best = max(sorted(preds), key=lambda k: srcc(preds[k], mos))
    assert caruana_select(preds, mos, rounds=1) == {best: 1.0}


def test_two_rounds_equal_the_brute_force_best_of_the_best_trial_alone_or_with_one_more():
    for seed in range(5):
        preds, mos = library(seed=seed)
        best = max(sorted(preds), key=lambda k: srcc(preds[k], mos))
        candidates = [{best: 1.0}] + [{best: 1.0} if k == best else {best: 0.5, k: 0.5} for k in sorted(preds)]
        want = max(candidates, key=lambda w: srcc(ensemble_predictions(preds, w), mos))  # first of equals
        assert caruana_select(preds, mos, rounds=2) == want


@pytest.mark.parametrize("seed", range(6))
def test_the_ensemble_is_never_worse_on_validation_than_the_best_trial_and_its_weights_sum_to_one(seed):
    preds, mos = library(n_trials=6, seed=seed)
    best = max(srcc(p, mos) for p in preds.values())
    for rounds in (1, 2, 5, 12):
        weights = caruana_select(preds, mos, rounds=rounds)
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
        assert all(w > 0 for w in weights.values())
        assert srcc(ensemble_predictions(preds, weights), mos) >= best
        # with replacement: every weight is a whole number of picks out of at most `rounds`
        picks = min(n for n in range(1, rounds + 1) if all(abs(w * n - round(w * n)) < 1e-9 for w in weights.values()))
        assert picks <= rounds


def test_greedy_selection_finds_a_complementary_pair_and_is_deterministic_whatever_the_order():
    rng = np.random.default_rng(3)
    mos = rng.uniform(0, 100, 60)
    noise = rng.normal(0, 20, 60)
    # a and b err in opposite directions: their mean is MOS itself; c is a worse single model
    preds = {"a": mos + noise, "b": mos - noise, "c": mos + rng.normal(0, 40, 60)}
    weights = caruana_select(preds, mos, rounds=4)
    assert srcc(ensemble_predictions(preds, weights), mos) == pytest.approx(1.0)
    assert weights == {"a": 0.5, "b": 0.5}
    reordered = dict(reversed(list(preds.items())))
    assert caruana_select(reordered, mos, rounds=4) == weights
    # equal trials: the smallest id wins
    assert caruana_select({"z": mos.copy(), "y": mos.copy()}, mos, rounds=3) == {"y": 1.0}


def test_exhaustive_search_over_small_multisets_never_beats_the_greedy_by_much_on_a_tiny_library():
    preds, mos = library(n_trials=3, n_photos=30, seed=7)
    greedy = srcc(ensemble_predictions(preds, caruana_select(preds, mos, rounds=3)), mos)
    best = max(srcc(ensemble_predictions(preds, {k: c / 3 for k, c in zip(*np.unique(combo, return_counts=True))}), mos)
               for combo in itertools.combinations_with_replacement(sorted(preds), 3))
    single = max(srcc(p, mos) for p in preds.values())
    assert single <= greedy <= best + 1e-12


@pytest.mark.parametrize("kwargs, match", [
    ({"rounds": 0}, "rounds must be a whole number >= 1"),
    ({"rounds": 2.5}, "rounds"),
    ({"rounds": 2, "val_predictions": {}}, "at least one trial"),
    ({"rounds": 2, "val_predictions": {"t1": np.zeros(3)}}, "t1: 3 validation predictions for 40"),
    ({"rounds": 2, "val_predictions": {"t1": np.full(40, np.nan)}}, "t1: non-finite"),
])
def test_bad_arguments_are_refused_naming_the_value(kwargs, match):
    preds, mos = library()
    kwargs = {"val_predictions": preds, "mos": mos, **kwargs}
    with pytest.raises(ValueError, match=match):
        caruana_select(**kwargs)


# ----------------------------------------------------------------------------- what trials record


@pytest.mark.parametrize("select_epoch", ["last", "best"])
def test_a_checkpoint_holds_the_kept_epochs_validation_predictions_as_reported(tiny_dataset, tmp_path, select_epoch):
    from iqa_ray.training.checkpoints import kept_val_predictions, load_checkpoint
    from iqa_ray.training.config import TrainConfig
    from iqa_ray.training.engine import fit
    from iqa_ray.training.loaders import load_decoded

    config = TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48, "batch_size": 8, "epochs": 3,
                                    "lr": 3e-3, "family": "mlp", "hidden_dim": 16, "pretrained": "offline",
                                    "select_epoch": select_epoch})
    decoded = load_decoded(config)
    saved = []
    result = fit(config, decoded, on_epoch_end=lambda e: saved.append((e.metrics, e.save(tmp_path / str(e.epoch)))),
                 score_test=False)
    metrics, path = saved[-1]
    ids, scores, mos, epoch = kept_val_predictions(load_checkpoint(path))
    val = decoded.split_indices("val")
    assert ids == decoded.table["image_id"].iloc[val].astype(str).tolist()
    assert epoch == metrics["best_epoch"] == result.best_epoch
    kept = result.history[epoch - 1]
    # the very predictions the reported validation metrics were computed from
    assert srcc(scores, mos) == kept["val_srcc"]
    np.testing.assert_allclose(mos, decoded.table["mos"].to_numpy()[val], rtol=1e-6)
    assert kept_val_predictions({"best_epoch": -1, "model": {}}) is None  # written before they were saved
    # a run resumed after its first epoch keeps the same predictions (one serialisation), even where the
    # epoch it keeps is the one before the resume
    resumed = []
    fit(config, decoded, resume=saved[0][1], on_epoch_end=lambda e: resumed.append(e.save(tmp_path / f"r{e.epoch}")),
        score_test=False)
    again_ids, again, _, again_epoch = kept_val_predictions(load_checkpoint(resumed[-1]))
    assert again_ids == ids and again_epoch == epoch
    np.testing.assert_array_equal(again, scores)


# ----------------------------------------------------------------------------- the averaged model


def experiment_with_members(root, checkpoint, weights, scale=(1.0, 1.5, 0.5)):
    """An experiment folder whose summary names an ensemble of trial folders: member i holds the
    one-epoch model with its last layer's weights times ``scale[i]`` (another model, same preparation)."""
    from iqa_ray.core.ensembles import ENSEMBLE_FILE, manifest
    from iqa_ray.training.checkpoints import CHECKPOINT_FILE, load_checkpoint

    state = load_checkpoint(checkpoint)
    last = [k for k in state["model"] if k.endswith("weight")][-1]
    members = []
    for i, weight in enumerate(weights):
        folder = root / f"trial_{i}" / "checkpoint_000000"
        folder.mkdir(parents=True)
        changed = {**state, "model": {**state["model"], last: state["model"][last] * scale[i]}, "best_model": None}
        torch.save(changed, folder / CHECKPOINT_FILE)
        (root / f"trial_{i}" / "params.json").write_text("{}")
        members.append({"model": f"trial_{i}", "weight": weight})
    (root / ENSEMBLE_FILE).write_text(json.dumps(manifest(members, rounds=len(weights))))
    (root / "summary.json").write_text(json.dumps({"model": ENSEMBLE_FILE, "best_trial": "trial_0"}))
    return root


def test_an_ensemble_of_one_scores_exactly_like_its_member(one_epoch_model, tmp_path):
    import iqa_ray

    experiment = experiment_with_members(tmp_path / "exp", one_epoch_model["checkpoint"], [1.0])
    member = iqa_ray.load_model(tmp_path / "exp" / "trial_0", device="cpu")
    ensemble = iqa_ray.load_model(experiment, device="cpu")
    assert "ensemble" in repr(ensemble) and "1 members" in repr(ensemble)
    np.testing.assert_array_equal(ensemble(one_epoch_model["paths"]), member(one_epoch_model["paths"]))


def test_an_ensemble_of_two_scores_their_weighted_mean_by_load_model_score_and_export(one_epoch_model, tmp_path, capsys):
    import subprocess
    import sys

    import iqa_ray
    from iqa_ray.cli import main as iqa_ray_main
    from iqa_ray.evaluation.portable import export_torchscript, load_metadata

    experiment = experiment_with_members(tmp_path / "exp", one_epoch_model["checkpoint"], [0.25, 0.75])
    paths = one_epoch_model["paths"]
    a, b = (iqa_ray.load_model(experiment / f"trial_{i}", device="cpu")(paths) for i in range(2))
    assert np.abs(a - b).max() > 0.01  # two different models
    ensemble = iqa_ray.load_model(experiment / "ensemble.json", device="cpu")
    expected = 0.25 * a + 0.75 * b
    np.testing.assert_allclose(ensemble(paths), expected, rtol=1e-6)
    # iqa-ray score on the experiment folder
    assert iqa_ray_main(["score", str(experiment), *paths[:4], "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    np.testing.assert_allclose([float(line.split(",")[1]) for line in lines], expected[:4], rtol=1e-5)
    # export-model: one TorchScript file of the averaging module, scoring like load_model without iqa_ray
    path = export_torchscript(ensemble, tmp_path / "ensemble.pt")
    np.save(tmp_path / "images.npy", one_epoch_model["images"])
    code = ("import sys, json, numpy as np, torch; sys.modules['iqa_ray'] = None; "
            f"m = torch.jit.load({str(path)!r}); x = torch.from_numpy(np.load({str(tmp_path / 'images.npy')!r}))"
            ".permute(0, 3, 1, 2).contiguous(); torch.set_num_threads(1); print(json.dumps(m(x).tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    scores = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(scores, ensemble(list(one_epoch_model["images"])), rtol=1e-5)
    assert load_metadata(path)["ensemble"] == {"members": 2, "weights": [0.25, 0.75]}


def test_bad_ensembles_are_clear_errors(one_epoch_model, tmp_path):
    import iqa_ray
    from iqa_ray.evaluation.cross_dataset import EvaluateError, run
    from iqa_ray.evaluation.scoring import ScoreError

    experiment = experiment_with_members(tmp_path / "exp", one_epoch_model["checkpoint"], [0.5, 0.5])
    manifest_file = experiment / "ensemble.json"
    record = json.loads(manifest_file.read_text())
    bad = {**record, "members": [{**record["members"][0], "weight": 0.7}, record["members"][1]]}
    manifest_file.write_text(json.dumps(bad))
    with pytest.raises(ScoreError, match="sum to 1.2"):
        iqa_ray.load_model(experiment, device="cpu")
    manifest_file.write_text(json.dumps({**record, "members": [{"model": "../elsewhere", "weight": 1.0}]}))
    with pytest.raises(ScoreError, match="not a trial folder below"):
        iqa_ray.load_model(experiment, device="cpu")
    manifest_file.write_text(json.dumps({**record, "members": [{"model": "trial_9", "weight": 1.0}]}))
    with pytest.raises(ScoreError, match="member trial_9 left no checkpoint"):
        iqa_ray.load_model(experiment, device="cpu")
    manifest_file.write_text(json.dumps(record))
    with pytest.raises(EvaluateError, match="iqa-ray evaluate scores one model"):
        run(type("Args", (), {"source": str(experiment), "device": "cpu", "out": None, "dataset": []})())


def test_members_that_prepare_photos_differently_are_refused_naming_the_key():
    from iqa_ray.evaluation.ensemble import EnsembleError, check_same_scoring
    from iqa_ray.training.config import TrainConfig

    configs = [TrainConfig.from_dict({"crop_size": 48}), TrainConfig.from_dict({"crop_size": 64})]
    check_same_scoring(configs[:1] * 2, ["a", "b"])
    with pytest.raises(EnsembleError, match="member b prepares photos unlike a .crop_size: 64 vs 48"):
        check_same_scoring(configs, ["a", "b"])


# ----------------------------------------------------------------------------- the search's side, without Ray


class FakeCheckpoint:
    def __init__(self, folder):
        self.folder = folder

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(str(self.folder))


class FakeResult:
    def __init__(self, folder, config, checkpoint=True):
        self.path, self.config = str(folder), config
        self.checkpoint = FakeCheckpoint(folder) if checkpoint else None


def fake_trial(root, name, scores, mos, *, epoch=3, reported=None, config=None, checkpoint=True):
    """A search trial whose checkpoint keeps ``scores`` of 4 validation photos at ``epoch``, reporting ``reported``."""
    from iqa_ray.training.checkpoints import CHECKPOINT_FILE

    folder = root / name
    folder.mkdir(parents=True)
    torch.save({"format": "iqa-ray", "model": {}, "best_epoch": epoch - 1,
                "kept_val": {"image_id": ["a", "b", "c", "d", "e"][:len(mos)],
                             "score": torch.tensor(scores, dtype=torch.float64),
                             "mos": torch.tensor(mos, dtype=torch.float64)}}, folder / CHECKPOINT_FILE)
    val = srcc(np.array(scores, dtype=float), np.array(mos, dtype=float)) if reported is None else reported
    rows = [{"epoch": e, "val_srcc": val if e == epoch else 0.0, "best_epoch": epoch} for e in range(1, epoch + 1)]
    return FakeResult(folder, {"lr": 1e-3, **(config or {})}, checkpoint), rows


def ranking_settings(tmp_path, *flags):
    from iqa_ray.cli.tune import build_parser
    from iqa_ray.search.settings import settings_from_args

    args = build_parser("ranking").parse_args(["--gpus", "0", "--storage", str(tmp_path), "--name", "e", *flags])
    return settings_from_args(args, "ranking")


def test_the_library_holds_the_trials_reported_predictions_and_says_why_others_are_left_out(tmp_path):
    from iqa_ray.core.errors import LaunchError
    from iqa_ray.search.ensemble import choose_ensemble, trial_library

    settings = ranking_settings(tmp_path, "--ensemble", "3")
    mos = [10.0, 20.0, 30.0, 40.0, 50.0]
    reports = {
        "t0": fake_trial(tmp_path, "t0", [1, 2, 3, 5, 4], mos),
        "t1": fake_trial(tmp_path, "t1", [2, 1, 3, 4, 5], mos),
        "t2": fake_trial(tmp_path, "t2", [5, 4, 3, 2, 1], mos, epoch=2, reported=-1.0),
        "t3": fake_trial(tmp_path, "t3", [1, 2, 3, 4, 5], mos, reported=0.5),  # not what it reported
        "t4": fake_trial(tmp_path, "t4", [1, 2, 3, 4, 5], mos, checkpoint=False),
        "t5": fake_trial(tmp_path, "t5", [1, 2, 3, 4, 5], mos, config={"crop_size": 96}),
    }
    reports["t2"][1][-1]["best_epoch"] = 1  # its reports keep epoch 1, its checkpoint epoch 2
    library, got_mos, left_out = trial_library(settings, reports, "t0")
    assert sorted(library) == ["t0", "t1"] and got_mos.tolist() == mos
    assert left_out["t2"].startswith("its newest checkpoint keeps epoch 2, its reports epoch 1")
    assert "give SRCC 1.000000, it reported 0.5" in left_out["t3"]
    assert left_out["t4"] == "its newest checkpoint holds no validation predictions"
    assert "prepares photos unlike" in left_out["t5"]
    record = choose_ensemble(settings, reports, "t0")
    assert record["best_trial"] == "t0" and record["best_trial_val_srcc"] == pytest.approx(0.9)
    assert record["val_srcc"] >= record["best_trial_val_srcc"] and record["library"] == 2
    assert sum(m["weight"] for m in record["members"]) == pytest.approx(1.0)
    assert record["members"][0]["search_trial"] == "t0" or record["members"][0]["weight"] >= 0.5
    json.dumps(record)  # summary.json holds it
    with pytest.raises(LaunchError, match="the selected trial t3 cannot start the ensemble: its recorded predictions"):
        trial_library(settings, reports, "t3")


def test_ensemble_flags_are_checked_and_recorded_for_resume(tmp_path):
    from iqa_ray.cli.tune import build_parser
    from iqa_ray.core.errors import LaunchError
    from iqa_ray.search.ensemble import check_ensemble
    from iqa_ray.search.run import write_experiment_info
    from iqa_ray.search.settings import resume_settings, settings_from_args

    assert ranking_settings(tmp_path).ensemble == 0
    with pytest.raises(LaunchError, match="--ensemble must be a whole number"):
        ranking_settings(tmp_path, "--ensemble", "-1")
    livec = f"livec:{Path(__file__).resolve().parents[1] / 'datasets' / 'livec'}"
    for flags, match in [(("--splits", "2", "--dataset", livec), "--ensemble 3 with --splits 2"),
                         (("--select", "latency_ms<=20"), "--ensemble 3 with --select latency_ms<=20")]:
        with pytest.raises(LaunchError, match=match):
            check_ensemble(ranking_settings(tmp_path, "--ensemble", "3", *flags))
    args = build_parser("ranking").parse_args(["--gpus", "0", "--storage", str(tmp_path), "--name", "rec",
                                               "--ensemble", "4"])
    s = settings_from_args(args, "ranking")
    check_ensemble(s)
    s.local_experiment_dir().mkdir(parents=True)
    write_experiment_info(s, args)
    assert json.loads((s.local_experiment_dir() / "experiment.json").read_text())["ensemble"] == 4
    resume = build_parser("ranking").parse_args(["--resume", "--storage", str(tmp_path), "--name", "rec"])
    assert resume_settings(resume, "ranking").ensemble == 4
    with pytest.raises(LaunchError, match=r"--ensemble \(2 now, 4 recorded\)"):
        resume_settings(build_parser("ranking").parse_args(["--resume", "--storage", str(tmp_path), "--name", "rec",
                                                             "--ensemble", "2"]), "ranking")
    # without --ensemble, experiment.json is as it was
    plain = build_parser("ranking").parse_args(["--gpus", "0", "--storage", str(tmp_path), "--name", "plain"])
    p = settings_from_args(plain, "ranking")
    p.local_experiment_dir().mkdir(parents=True)
    write_experiment_info(p, plain)
    assert "ensemble" not in json.loads((p.local_experiment_dir() / "experiment.json").read_text())


def test_member_refits_train_each_members_config_on_training_and_validation_photos():
    from iqa_ray.search.retrain import MemberConfigs

    resolve = MemberConfigs({"t1": {"lr": 1e-3, "alpha": 0.1}, "t2": {"lr": 2e-3, "alpha": 0.5}})
    assert resolve({"ensemble_member": "t2", "lr": 9.0}) == {"lr": 2e-3, "alpha": 0.5, "train_on_val": True}
    import pickle

    assert pickle.loads(pickle.dumps(resolve))({"ensemble_member": "t1"})["alpha"] == 0.1


def test_the_summary_prints_the_members_and_the_selected_trial_beside_the_ensemble():
    from iqa_ray.search.ensemble import ensemble_lines

    record = {"rounds": 5, "metric": "val_srcc", "library": 8, "left_out": {"t9": "x"}, "best_trial": "t1",
              "members": [{"trial_id": "t1", "weight": 0.6, "val_srcc": 0.81, "search_trial": "trial_t1",
                           "model": "refit/trial_a"},
                          {"trial_id": "t4", "weight": 0.4, "val_srcc": 0.79, "search_trial": "trial_t4",
                           "model": "refit/trial_b"}],
              "val_srcc": 0.83, "best_trial_val_srcc": 0.81, "test": {"srcc": 0.85, "n": 125},
              "best_trial_test": {"srcc": 0.84, "n": 125}}
    text = "\n".join(ensemble_lines(record))
    assert "2 trials by 5 greedy rounds" in text and "library of 8 trials, 1 left out" in text
    assert "t1  weight 0.600  validation SRCC 0.8100 -> refit/trial_a" in text
    assert "validation SRCC: ensemble 0.8300, selected trial t1 0.8100" in text
    assert "test SRCC: ensemble 0.8500, selected trial's own model 0.8400 (+0.0100, same 125 photos)" in text
    assert ensemble_lines({}) == []
