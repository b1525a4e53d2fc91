import math
import pickle

import numpy as np
import pytest
import torch

from iqa_ray.core.io import CheckpointError
from iqa_ray.core.metrics import srcc
from iqa_ray.training.checkpoints import load_checkpoint, model_from_checkpoint
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import NonFiniteLossError, fit
from iqa_ray.training.inference import evaluate
from iqa_ray.training.loaders import load_decoded, make_loaders
from iqa_ray.training.schedule import lr_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(tiny_dataset, **kw):
    base = {"dataset": str(tiny_dataset.path), "crop_size": 48, "batch_size": 8, "eval_batch_size": 32,
            "epochs": 3, "lr": 3e-3, "family": "mlp", "pretrained": "offline"}
    base.update(kw)
    if base["family"] in ("mlp", "gmm"):
        base.setdefault("hidden_dim", 32)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def decoded(tiny_dataset):
    return load_decoded(TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48}))


@pytest.fixture(scope="module")
def four_epochs(tiny_dataset, decoded, one_torch_thread_module):
    """One 4-epoch run of the small config on one thread: its config, result and the epochs its
    callback saw (the two tests below read the same run; neither changes it)."""
    config = small(tiny_dataset, epochs=4)
    seen = []
    return config, fit(config, decoded, on_epoch_end=seen.append), seen


def test_training_loss_falls_and_every_epoch_reports_the_metrics(four_epochs):
    _, result, seen = four_epochs
    assert [e.epoch for e in seen] == [0, 1, 2, 3]
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    for key in ("train_loss", "val_srcc", "val_plcc", "val_krcc", "val_rmse", "val_plcc_logistic",
                "lr_head", "lr_backbone", "images_per_s", "epoch"):
        assert key in last and np.isfinite(last[key]), key


def test_model_selection_uses_validation_and_test_is_scored_once_for_the_best(four_epochs, decoded):
    config, result, _ = four_epochs
    vals = [h["val_srcc"] for h in result.history]
    assert result.best_epoch == int(np.argmax(vals)) + 1
    assert result.best_val["srcc"] == pytest.approx(max(vals))
    loaders = make_loaders(config, decoded)
    again = evaluate(result.model, loaders.test, torch.device("cpu"))
    assert again == result.test  # the returned model is the best one and evaluation is deterministic
    pred, mos = result.test_predictions
    assert srcc(pred, mos) == pytest.approx(result.test["srcc"])


def test_a_search_trial_reports_validation_only_and_never_touches_the_test_split(tiny_dataset, decoded, monkeypatch):
    import iqa_ray.training.feeds as feeds

    scored = []
    real_predict = feeds.predict
    splits = decoded.table["split"].to_numpy()

    def predict(model, loader, *args, **kwargs):
        scored.extend(set(splits[loader.dataset.indices]))
        return real_predict(model, loader, *args, **kwargs)

    monkeypatch.setattr(feeds, "predict", predict)
    reports = []
    result = fit(small(tiny_dataset, epochs=2), decoded, on_epoch_end=reports.append, score_test=False)
    assert result.test is None and result.test_predictions is None
    assert not [k for e in reports for k in e.metrics if k.startswith("test_")]
    assert "test" not in scored and scored.count("val") == 2
    assert [e.metrics["stopped_early"] for e in reports] == [False, False]


@pytest.mark.slow
@pytest.mark.in_process
def test_resumed_run_equals_an_uninterrupted_run(tiny_dataset, decoded, tmp_path):
    config = small(tiny_dataset, epochs=3, family="hyperiqa", lr_schedule="cosine", warmup_epochs=0.5)
    uninterrupted = fit(config, decoded)

    saved = {}

    def keep(e):
        saved[e.epoch] = e.save(tmp_path / f"epoch{e.epoch}")

    fit(config, decoded, on_epoch_end=keep, max_epochs=2)  # "killed" after epoch index 1
    resumed = fit(config, decoded, resume=saved[1])
    assert [h["val_srcc"] for h in resumed.history] == [h["val_srcc"] for h in uninterrupted.history]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in uninterrupted.history]
    assert resumed.test == uninterrupted.test
    assert resumed.best_epoch == uninterrupted.best_epoch


def test_resume_refuses_a_checkpoint_of_another_config(tiny_dataset, decoded, tmp_path):
    out = {}
    fit(small(tiny_dataset, epochs=1), decoded, on_epoch_end=lambda e: out.setdefault("p", e.save(tmp_path)))
    with pytest.raises(CheckpointError, match="different config"):
        fit(small(tiny_dataset, epochs=1, lr=1e-2), decoded, resume=out["p"])


def test_optimizer_state_persists_and_every_group_keeps_training(tiny_dataset, decoded):
    """The seeds' three bugs: optimiser re-created, hypernetwork frozen after epoch 1, backbone LR constant."""
    config = small(tiny_dataset, epochs=3, family="hyperiqa", lr_schedule="cosine", eta_min=0.0)
    snapshots = []

    def snap(e):
        snapshots.append({k: v.detach().clone() for k, v in result_model["m"].named_parameters()})

    result_model = {}
    import iqa_ray.training.engine as engine

    real_build = engine.build

    def capture(cfg, device):
        result_model["m"] = real_build(cfg, device)
        return result_model["m"]

    engine.build = capture
    try:
        result = fit(config, decoded, on_epoch_end=snap)
    finally:
        engine.build = real_build
    hyper = [k for k in snapshots[0] if "hyper" in k]
    assert hyper, "hypernetwork parameters exist"
    for k in hyper:  # the hypernetwork still changes between epochs 2 and 3
        assert not torch.equal(snapshots[1][k], snapshots[2][k]), k
    lrs = [h["lr_backbone"] for h in result.history]
    assert lrs[0] > lrs[1] > lrs[2] > 0, "backbone LR decays with the schedule"
    heads = [h["lr_hypernet"] for h in result.history]
    assert heads[0] == pytest.approx(10 * config.optim.lr)


def test_lr_schedules():
    cfg = TrainConfig.from_dict({"epochs": 10, "lr_schedule": "cosine", "eta_min": 0.0, "warmup_epochs": 2})
    assert lr_factor(cfg, 0, 10) == 0.0
    assert lr_factor(cfg, 10, 10) == pytest.approx(0.5)  # half-way through warm-up
    assert lr_factor(cfg, 20, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 10) == pytest.approx(0.5)  # cosine mid-point after warm-up
    assert lr_factor(cfg, 100, 10) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig.from_dict({"epochs": 20, "lr_schedule": "step", "step_size": 6, "gamma": 0.1})
    assert [lr_factor(step, e * 5, 5) for e in (0, 5, 6, 12)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(TrainConfig.from_dict({"lr_schedule": "none"}), 123, 4) == 1.0


def test_plateau_reduces_lr_when_validation_stalls(tiny_dataset, decoded):
    config = small(tiny_dataset, epochs=4, lr_schedule="plateau", plateau_patience=0, plateau_factor=0.5, lr=1e-9)
    result = fit(config, decoded)  # an LR this small cannot improve validation SRCC
    lrs = [h["lr_head"] for h in result.history]
    assert lrs[-1] < lrs[0]


def test_early_stopping_stops_after_patience(tiny_dataset, decoded):
    config = small(tiny_dataset, epochs=8, lr=1e-9, early_stopping_patience=2, lr_schedule="none")
    result = fit(config, decoded)
    assert result.stopped_early and len(result.history) < 8


def test_non_finite_loss_stops_with_the_epoch_named(tiny_dataset, decoded, monkeypatch):
    from iqa_ray.models.mlp import MLPIQA

    real = MLPIQA.compute_loss

    def poisoned(self, outputs, target):
        losses = real(self, outputs, target)
        losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(MLPIQA, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="became nan at epoch 0"):
        fit(small(tiny_dataset), decoded)


def test_checkpoint_round_trip_and_tampered_checkpoints_are_refused(tiny_dataset, decoded, tmp_path):
    out = {}
    result = fit(small(tiny_dataset, epochs=2), decoded, on_epoch_end=lambda e: out.__setitem__(e.epoch, e.save(tmp_path / str(e.epoch))))
    model, config = model_from_checkpoint(out[1])
    loaders = make_loaders(config, decoded)
    assert evaluate(model, loaders.test, torch.device("cpu")) == result.test

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    state = torch.load(out[1], weights_only=True)
    state["extra"] = Evil()
    bad = tmp_path / "tampered.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(bad)
    (tmp_path / "garbage.pt").write_bytes(pickle.dumps({"format": "iqa-ray"})[:10])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_label_fraction_keeps_a_subset_of_training_photos(tiny_dataset, decoded):
    full = make_loaders(small(tiny_dataset), decoded)
    part = make_loaders(small(tiny_dataset, label_fraction=0.3), decoded)
    assert 0 < len(part.train.dataset) < len(full.train.dataset)
    assert len(part.val.dataset) == len(full.val.dataset)
    groups = decoded.table["group"].to_numpy()
    assert set(groups[part.train.dataset.indices]) < set(groups[full.train.dataset.indices])


@pytest.mark.slow
@pytest.mark.in_process
@pytest.mark.parametrize("family", ["gmm", "hyperiqa"])
def test_every_family_trains_through_the_same_loop(tiny_dataset, decoded, family):
    kw = {"n_clusters": 3, "feature_dim": 16, "hidden_dim": 16} if family == "gmm" else {"multiscale": True}
    config = small(tiny_dataset, family=family, **kw)
    result = fit(config, decoded)
    assert math.isfinite(result.test["srcc"]) and result.history[-1]["train_loss"] < result.history[0]["train_loss"]
