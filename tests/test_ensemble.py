"""Ensembles a search hands back (issue 36): greedy selection over the trials' validation
predictions, the predictions the trials record, and the averaged model (load_model, score, export)."""

import itertools
import json

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
    ids, scores, epoch = kept_val_predictions(load_checkpoint(path))
    val = decoded.split_indices("val")
    assert ids == decoded.table["image_id"].iloc[val].astype(str).tolist()
    assert epoch == metrics["best_epoch"] == result.best_epoch
    kept = result.history[epoch - 1]
    # the very predictions the reported validation metrics were computed from
    assert srcc(scores, decoded.table["mos"].to_numpy()[val]) == kept["val_srcc"]
    assert kept_val_predictions({"best_epoch": -1, "model": {}}) is None  # written before they were saved
    # a run resumed after its first epoch keeps the same predictions (one serialisation), even where the
    # epoch it keeps is the one before the resume
    resumed = []
    fit(config, decoded, resume=saved[0][1], on_epoch_end=lambda e: resumed.append(e.save(tmp_path / f"r{e.epoch}")),
        score_test=False)
    again_ids, again, again_epoch = kept_val_predictions(load_checkpoint(resumed[-1]))
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
