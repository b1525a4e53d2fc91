"""Quality-aware pre-training: objective, loop, encoder files, fine-tuning from an encoder, the command."""

import json
import pickle

import numpy as np
import pytest
import torch

from iqa_ray.core.errors import DatasetError
from iqa_ray.core.io import CheckpointError
from iqa_ray.core.options import ConfigError
from iqa_ray.evaluation.cross_dataset import cross_dataset_table
from iqa_ray.models.backbones import create_backbone
from iqa_ray.models.encoder_file import EncoderError, load_encoder_into, save_encoder
from iqa_ray.ssl.config import PretrainConfig
from iqa_ray.ssl.data import level_grid, load_unlabelled, make_sample
from iqa_ray.ssl.loop import pretrain
from iqa_ray.ssl.model import ranking_accuracy, ssl_loss
from iqa_ray.training.build import build
from iqa_ray.training.checkpoints import model_from_checkpoint
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.engine import fit
from iqa_ray.training.inference import evaluate_dataset
from iqa_ray.training.loaders import load_decoded

EASY = ("gaussian_blur", "gaussian_noise", "jpeg")
# Metrics that measure time, not what was computed.
TIMING = {"images_per_s", "crops_per_s", "sampling_share", "epoch_seconds"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photos():
    """Real photos (the embedded set), downscaled so crops and distortions are cheap."""
    return load_unlabelled("embedded", max_short_side=96)


def tiny(**kw):
    base = {"crop_size": 48, "levels": 3, "batch_size": 4, "images_per_epoch": 16, "epochs": 2, "lr": 1e-3,
            "distortions": EASY, "embedding_dim": 16, "hidden_dim": 32, "holdout_images": 3, "eval_samples": 12}
    base.update(kw)
    return PretrainConfig.from_dict(base)


# ----------------------------------------------------------------------------- objective


def test_levels_are_increasing_inside_the_range_even_with_jitter():
    rng = np.random.default_rng(0)
    for _ in range(50):
        grid = level_grid(5, (0.1, 0.9), 0.99, rng)
        assert np.all(np.diff(grid) > 0) and grid.min() >= 0 and grid.max() <= 1
    assert np.allclose(level_grid(3, (0.2, 0.8), 0.0, rng), [0.2, 0.5, 0.8])


def test_a_sample_is_two_crops_at_k_levels_of_one_type_and_is_seeded(photos):
    image = photos.images[0]
    kw = {"crop_size": 40, "levels": 4, "level_range": (0.1, 0.9), "level_jitter": 0.5, "distortions": EASY}
    crops, kind, levels = make_sample(image, np.random.default_rng(3), **kw)
    again, kind2, levels2 = make_sample(image, np.random.default_rng(3), **kw)
    assert crops.shape == (2, 4, 40, 40, 3) and crops.dtype == np.uint8
    assert kind in EASY and np.all(np.diff(levels) > 0)
    assert np.array_equal(crops, again) and kind == kind2 and np.array_equal(levels, levels2)
    # a stronger level moves a crop further from its least degraded version
    for c in range(2):
        far = [np.abs(crops[c, k].astype(float) - crops[c, 0]).mean() for k in range(4)]
        assert far[1] < far[2] < far[3], (kind, far)


def test_grey_photos_never_get_colour_only_distortions():
    grey = np.repeat(np.random.default_rng(0).integers(0, 255, (64, 64, 1), dtype=np.uint8), 3, axis=2)
    kw = {"crop_size": 32, "levels": 2, "level_range": (0.1, 0.9), "level_jitter": 0.0}
    for seed in range(10):
        assert make_sample(grey, np.random.default_rng(seed), distortions=("saturation", "jpeg"), **kw)[1] == "jpeg"
    with pytest.raises(DatasetError, match="grey"):
        make_sample(grey, np.random.default_rng(0), distortions=("saturation",), **kw)


def test_loss_rewards_the_right_order_and_agreeing_crops():
    ordered = torch.tensor([0.5, 0.2, -0.1]).expand(3, 2, 3).clone()  # (B, 2 crops, K levels)
    emb = torch.nn.functional.normalize(torch.randn(3, 1, 3, 8), dim=-1).expand(3, 2, 3, 8)
    good = ssl_loss(ordered, emb, margin=0.1)
    assert float(good["ranking"]) == 0 and float(good["agreement"]) == pytest.approx(0, abs=1e-6)
    assert float(good["pair_accuracy"]) == 1 and ranking_accuracy(ordered) == 1
    bad = ssl_loss(ordered.flip(-1), torch.nn.functional.normalize(torch.randn(3, 2, 3, 8), dim=-1), margin=0.1)
    assert float(bad["ranking"]) > 0.1 and float(bad["agreement"]) > 0.1 and float(bad["pair_accuracy"]) == 0
    # pairs closer than the margin still cost something
    assert float(ssl_loss(ordered, emb, margin=0.5)["ranking"]) > 0
    with pytest.raises(ValueError, match=r"\(B, 2, K\)"):
        ssl_loss(torch.zeros(3, 3), emb, margin=0.1)


@pytest.mark.parametrize("key, value, match", [
    ("levels", 1, "levels"),
    ("level_range", (0.8, 0.2), "level_range"),
    ("level_jitter", 1.0, "level_jitter"),
    ("margin", -0.1, "margin"),
    ("ranking_weight", 0.0, "ranking_weight"),
    ("crop_size", 8, "crop_size"),
    ("images_per_epoch", 2, "images_per_epoch"),
    ("distortions", ("blurr",), "unknown distortions"),
    ("backbone", "resnet9000", "unknown backbone"),
    ("lr", float("nan"), "lr"),
    ("epochs", 0, "epochs"),
])
def test_bad_pretrain_config_values_fail_with_the_key_named(key, value, match):
    with pytest.raises(ConfigError, match=match):
        PretrainConfig.from_dict({key: value})


def test_unknown_pretrain_keys_are_listed():
    with pytest.raises(ConfigError, match="unknown pre-training config keys \\['K'\\].*levels"):
        PretrainConfig.from_dict({"K": 4})
    assert PretrainConfig.from_dict(json.loads(json.dumps(tiny().to_dict()))) == tiny()


# ----------------------------------------------------------------------------- the loop


def test_pretraining_on_real_photos_lowers_the_loss_and_ranks_held_out_levels(photos):
    seen = []
    result = pretrain(tiny(epochs=4, images_per_epoch=24), photos, device="cpu", on_epoch_end=seen.append)
    assert [e.epoch for e in seen] == [0, 1, 2, 3]
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["val_loss"] < result.initial["val_loss"]
    # held-out photos (never trained on): degradation order recognised well above chance (0.5)
    assert last["val_ranking_accuracy"] > 0.65 > result.initial["val_ranking_accuracy"]
    for key in ("train_ranking", "train_agreement", "train_pair_accuracy", "val_ranking_accuracy", "images_per_s",
                "lr_backbone"):
        assert np.isfinite(last[key]), key


def test_resumed_pretraining_equals_an_uninterrupted_run(photos, tmp_path):
    config = tiny(epochs=2, images_per_epoch=8, eval_samples=4)
    uninterrupted = pretrain(config, photos, device="cpu")
    saved = {}
    pretrain(config, photos, device="cpu", max_epochs=1, on_epoch_end=lambda e: saved.update({e.epoch: e.save(tmp_path)}))
    resumed = pretrain(config, photos, device="cpu", resume=saved[0])

    def values(history):
        return [{k: v for k, v in h.items() if k not in TIMING} for h in history]

    assert values(resumed.history) == values(uninterrupted.history)
    a, b = uninterrupted.encoder.state_dict(), resumed.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="different config"):
        pretrain(tiny(epochs=2, images_per_epoch=8, eval_samples=4, margin=0.2), photos, device="cpu", resume=tmp_path)


def test_too_few_or_too_small_images_fail_before_training(photos):
    with pytest.raises(DatasetError, match="holdout_images"):
        pretrain(tiny(), photos.images[:3], device="cpu")
    with pytest.raises(DatasetError, match="smaller than crop_size"):
        pretrain(tiny(crop_size=128), photos, device="cpu")


def test_unlabelled_images_from_a_generated_table_respect_splits(tiny_dataset):
    train = load_unlabelled(str(tiny_dataset.path), splits=("train",), pristine_only=True)
    everything = load_unlabelled(str(tiny_dataset.path))
    table = load_decoded(TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48})).table
    expected = table[(table["split"] == "train") & (table["distortion"] == "none")]["image_id"]
    assert sorted(train.names) == sorted(expected) and len(everything) == len(table)
    with pytest.raises(DatasetError, match="splits"):
        load_unlabelled(str(tiny_dataset.path), splits=("holdout",))


# ----------------------------------------------------------------------------- encoder files


def perturbed_encoder(path, name="efficientnet_lite0"):
    """An encoder file whose weights differ from the offline ImageNet weights."""
    backbone = create_backbone(name, pretrained="offline" if "lite0" in name else "none")
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_encoder(backbone, path)
    return backbone


def test_encoder_files_load_strictly_and_explain_mismatches(tmp_path):
    source = perturbed_encoder(tmp_path / "encoder.pt")
    target = create_backbone("efficientnet_lite0", pretrained="none")
    meta = load_encoder_into(target, tmp_path)  # a folder holding encoder.pt works too
    assert meta["backbone"] == "efficientnet_lite0"
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())

    with pytest.raises(EncoderError, match="pre-trained for backbone 'efficientnet_lite0'.*'resnet18'"):
        load_encoder_into(create_backbone("resnet18"), tmp_path / "encoder.pt")

    state = torch.load(tmp_path / "encoder.pt", weights_only=True)
    key = next(k for k, v in state["state_dict"].items() if v.ndim == 4)
    state["state_dict"][key] = state["state_dict"][key][:, :1]
    dropped = list(state["state_dict"])[-1]
    del state["state_dict"][dropped]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(EncoderError, match=f"missing keys: {dropped}.*shape mismatches.*{key}"):
        load_encoder_into(target, tmp_path / "broken.pt")

    torch.save({"format": "iqa-ray", "model": {}}, tmp_path / "not_encoder.pt")
    with pytest.raises(EncoderError, match="not an iqa-ray-encoder file"):
        load_encoder_into(target, tmp_path / "not_encoder.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print, protocol=2))  # arbitrary objects are refused, not unpickled
    with pytest.raises(EncoderError, match="refusing to load"):
        load_encoder_into(target, tmp_path / "evil.pt")
    with pytest.raises(EncoderError, match="not found"):
        load_encoder_into(target, tmp_path / "missing.pt")


def test_fine_tuning_starts_from_the_encoder_and_scores_in_the_cross_dataset_table(tiny_dataset, tmp_path):
    encoder = perturbed_encoder(tmp_path / "encoder.pt")
    config = TrainConfig.from_dict({
        "dataset": str(tiny_dataset.path), "crop_size": 48, "batch_size": 8, "eval_batch_size": 32, "epochs": 1,
        "family": "mlp", "hidden_dim": 16, "pretrained_encoder": str(tmp_path / "encoder.pt"),
        "lr": 1e-3, "backbone_lr": 1e-4})
    start = build(config, torch.device("cpu")).backbone.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in encoder.state_dict().items())  # the encoder, not ImageNet
    imagenet = build(config.replace(pretrained_encoder=None), torch.device("cpu")).backbone.state_dict()
    assert not all(torch.equal(v, imagenet[k]) for k, v in start.items())

    result = fit(config, device="cpu", on_epoch_end=lambda e: e.save(tmp_path / "run"))
    assert result.history[0]["lr_backbone"] == pytest.approx(1e-4)  # the encoder's own, smaller LR
    # the checkpoint holds the weights: it rebuilds even after the encoder file is gone
    (tmp_path / "encoder.pt").unlink()
    with pytest.raises(ConfigError, match="pretrained_encoder"):
        config.replace(lr=2e-3)
    model, saved_config = model_from_checkpoint(tmp_path / "run")
    assert saved_config.model.pretrained_encoder is None

    spec = str(tiny_dataset.path)
    table = cross_dataset_table({"fit": result, "checkpoint": str(tmp_path / "run")},
                                {"test": (spec, "test"), "all": spec})
    assert list(table.columns) == ["test SRCC", "test PLCC", "all SRCC", "all PLCC"]
    assert table.loc["fit", "test SRCC"] == pytest.approx(result.test["srcc"])
    assert table.loc["checkpoint", "all PLCC"] == pytest.approx(evaluate_dataset(model, config, spec)["plcc"])
    assert table.attrs["n"]["all"] > table.attrs["n"]["test"]


def test_encoder_of_another_backbone_fails_when_the_model_is_built(tmp_path):
    perturbed_encoder(tmp_path / "encoder.pt")
    config = TrainConfig.from_dict({"family": "mlp", "backbone": "resnet18", "pretrained": "none",
                                    "pretrained_encoder": str(tmp_path / "encoder.pt")})
    with pytest.raises(EncoderError, match="backbone 'efficientnet_lite0'"):
        build(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match="existing encoder file"):
        TrainConfig.from_dict({"pretrained_encoder": str(tmp_path / "nope.pt")})


# ----------------------------------------------------------------------------- the command


def test_pretrain_help_documents_every_option():
    from dataclasses import fields

    from iqa_ray.cli.pretrain import build_parser

    text = build_parser().format_help()
    for option in ("--source", "--splits", "--pristine-only", "--max-short-side", "--out", "--resume", "--device",
                   "--threads", "--config"):
        assert option in text
    for f in fields(PretrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_pretrain_command_writes_its_run_folder_and_resumes(tmp_path, capsys):
    from PIL import Image

    from iqa_ray.cli.pretrain import main

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        smooth = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        Image.fromarray(smooth).save(folder / f"p{i}.png")
    out = tmp_path / "run"
    args = ["--source", str(folder), "--out", str(out), "--crop-size", "32", "--levels", "2", "--batch-size", "2",
            "--images-per-epoch", "2", "--eval-samples", "2", "--embedding-dim", "8", "--hidden-dim", "8",
            "--distortions", "gaussian_blur", "jpeg", "--threads", "1"]
    assert main([*args, "--epochs", "1"]) == 0
    assert "encoder:" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["distortions"] == ["gaussian_blur", "jpeg"] and config["git_revision"]
    assert config["n_images"] == 4 and config["data"]["source"] == str(folder)
    assert list(out.glob("events.out.tfevents.*")) and (out / "checkpoint.pt").exists()
    load_encoder_into(create_backbone("efficientnet_lite0"), out / "encoder.pt")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    assert main([*args, "--epochs", "1"]) == 2  # the same folder is not overwritten
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--epochs", "1", "--resume", "--out", str(tmp_path / "empty")]) == 2
    assert "--resume: no checkpoint.pt in" in capsys.readouterr().err and not (tmp_path / "empty").exists()
    assert main([*args, "--epochs", "2", "--resume"]) == 2  # another config is refused
    assert "different config" in capsys.readouterr().err
    assert main([*args, "--levels", "1", "--out", str(tmp_path / "other")]) == 2
    assert "levels" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ray Tune


@pytest.mark.slow
def test_pretrain_trainable_reports_every_epoch_with_an_encoder(photos, tmp_path, shared_ray):
    from ray import tune

    from iqa_ray.trainables.pretraining import pretrain_trainable

    trainable = tune.with_parameters(pretrain_trainable, images=photos.images)
    space = {**tiny(epochs=2, images_per_epoch=8, eval_samples=4).to_dict(), "levels": tune.grid_search([2, 3])}
    tuner = tune.Tuner(trainable, param_space=space, run_config=tune.RunConfig(storage_path=str(tmp_path), name="pretrain"))
    results = tuner.fit()
    assert not results.errors and len(results) == 2
    for result in results:
        assert result.metrics["training_iteration"] == 2 and "val_ranking_accuracy" in result.metrics
        meta = load_encoder_into(create_backbone("efficientnet_lite0"), result.checkpoint.path)
        assert meta["epoch"] == 1 and meta["config"]["levels"] == result.config["levels"]
