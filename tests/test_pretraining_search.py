"""Searching `pretraining = none | ssl` (seed 004): the study, the encoder cache, a real search."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from iqa_ray.search.encoders import encoder_dir, prepare_encoders, pretraining_source
from iqa_ray.search.study import StudyError
from iqa_ray.search.study_file import load_study, parse_study
from iqa_ray.ssl.data import load_unlabelled as _REAL_LOAD_UNLABELLED  # the spy below wraps it

ROOT = Path(__file__).resolve().parents[1]


def ssl_study(**pretraining):
    return {"study": {"num_samples": 2}, "fixed": {"family": "mlp"},
            "pretraining": pretraining,
            "params": {"pretraining": {"role": "scientific", "type": "choice", "values": ["none", "ssl"]},
                       "backbone_lr": {"role": "scientific", "type": "loguniform", "low": 1e-5, "high": 1e-3}}}


def test_the_shipped_pretraining_study_searches_the_choice_and_the_encoder_lr():
    study = load_study("pretraining")
    params = {p.name: p for p in study.params}
    assert params["pretraining"].values == ("none", "ssl")
    assert params["backbone_lr"].type == "loguniform" and params["backbone_lr"].low == 1e-5
    assert study.encoder_backbones() == ("efficientnet_lite0",)
    config = study.pretrain_config("efficientnet_lite0")
    assert config.backbone == "efficientnet_lite0" and config.pretrained == "offline"  # from [fixed]
    assert pretraining_source(study) == ("embedded", ("train",), False, 0)
    for name in ("ranking", "gmm", "lr_schedule", "backbone"):  # nothing else pre-trains
        assert load_study(name).encoder_backbones() == ()


def test_resolve_turns_ssl_into_the_backbones_encoder_file_and_none_into_nothing(tmp_path):
    study = parse_study(ssl_study(epochs=1), name="s")
    with pytest.raises(StudyError, match="no pre-trained encoder was prepared for backbone 'efficientnet_lite0'"):
        study.resolve({"pretraining": "ssl", "backbone_lr": 1e-4})
    ready = study.with_encoders({"efficientnet_lite0": str(tmp_path / "encoder.pt")})
    assert ready.resolve({"pretraining": "ssl", "backbone_lr": 1e-4}) == {
        "backbone_lr": 1e-4, "pretrained_encoder": str(tmp_path / "encoder.pt")}
    assert ready.resolve({"pretraining": "none", "backbone_lr": 1e-4}) == {"backbone_lr": 1e-4}


def test_reports_and_hparams_show_the_searched_pretraining_choice_next_to_its_encoder(tmp_path):
    from iqa_ray.search.tensorboard import trial_hparams

    study = parse_study(ssl_study(epochs=1), name="s").with_encoders({"efficientnet_lite0": str(tmp_path / "e.pt")})
    ssl = {"pretraining": "ssl", "backbone_lr": 1e-4}
    assert study.reported_config(ssl) == {"pretraining": "ssl", "backbone_lr": 1e-4,
                                          "pretrained_encoder": str(tmp_path / "e.pt")}
    assert study.reported_config({"pretraining": "none", "backbone_lr": 1e-4}) == {
        "pretraining": "none", "backbone_lr": 1e-4}
    hparams = trial_hparams(study, ssl)
    assert hparams["pretraining"] == "ssl" and hparams["backbone_lr"] == 1e-4


def test_one_encoder_per_searched_backbone():
    data = ssl_study()
    data["fixed"]["pretrained"] = "none"
    data["params"]["backbone"] = {"role": "scientific", "type": "choice", "values": ["resnet18", "efficientnet_lite0"]}
    study = parse_study(data, name="s")
    assert study.encoder_backbones() == ("resnet18", "efficientnet_lite0")
    assert study.pretrain_config("resnet18").pretrained == "none"


@pytest.mark.parametrize("data, match", [
    (ssl_study(levels=1), "levels \\(K\\) must be an integer >= 2"),
    (ssl_study(epochz=3), "unknown pre-training config keys \\['epochz'\\]"),
    (ssl_study(backbone="resnet18"), "takes no backbone"),
    (ssl_study(splits=["train", "test"]), "may not include 'test'"),
    (ssl_study(splits=["training"]), "splits must be a non-empty list"),
    ({**ssl_study(), "params": {**ssl_study()["params"],
                                "split_seed": {"role": "nuisance", "type": "choice", "values": [0, 1]}}},
     "split_seed cannot be searched"),
    ({"fixed": {"family": "mlp", "pretraining": "imagenet"},
      "params": {"lr": {"role": "nuisance", "type": "loguniform", "low": 1e-4, "high": 1e-3}}}, "must be one of"),
    ({"fixed": {"family": "mlp"}, "params": {"pretraining": {"role": "scientific", "type": "choice",
                                                             "values": ["none", "dino"]}}}, "values must be among"),
    ({"fixed": {"family": "mlp"}, "params": {"pretraining": {"role": "scientific", "type": "uniform",
                                                             "low": 0, "high": 1}}}, "searched as type"),
    ({"fixed": {"family": "mlp"}, "pretraining": {"epochs": 2},
      "params": {"lr": {"role": "nuisance", "type": "loguniform", "low": 1e-4, "high": 1e-3}}}, "no trial can use it"),
])
def test_bad_pretraining_settings_are_rejected_when_the_study_loads(data, match):
    with pytest.raises(StudyError, match=match):
        parse_study(data, name="bad")


def test_a_cached_encoder_is_reused_without_pre_training_again(tmp_path):
    study = parse_study(ssl_study(epochs=2), name="s")
    config = study.pretrain_config("efficientnet_lite0")
    folder = encoder_dir(config, "embedded", ("train",), tmp_path, split_seed=0)
    folder.mkdir(parents=True)
    (folder / "encoder.pt").write_bytes(b"cached")
    messages = []
    assert prepare_encoders(study, root=tmp_path, progress=messages.append) == {
        "efficientnet_lite0": str((folder / "encoder.pt").resolve())}
    assert "reusing" in messages[0]
    # another pre-training config is another cache entry
    other = parse_study(ssl_study(epochs=3), name="s").pretrain_config("efficientnet_lite0")
    assert encoder_dir(other, "embedded", ("train",), tmp_path, split_seed=0) != folder
    assert encoder_dir(config, "embedded", ("train", "val"), tmp_path, split_seed=0) != folder
    assert encoder_dir(config, "embedded", ("train",), tmp_path, split_seed=1) != folder


@pytest.mark.parametrize("key, values", [("split_seed", [0, 1]), ("image_size", [[512, 384], [256, 192]]),
                                         ("label", ["severity", "ssim"])])
def test_a_key_that_shapes_the_decoded_dataset_cannot_be_searched_even_without_pre_training(key, values):
    # Every trial reads the one dataset the launcher decodes from the fixed values: a searched
    # split_seed would be recorded in each trial's config and silently ignored.
    data = {"fixed": {"family": "mlp"}, "params": {key: {"role": "nuisance", "type": "choice", "values": values}}}
    with pytest.raises(StudyError, match=f"{key} cannot be searched.*silently ignored"):
        parse_study(data, name="s")


# --------------------------------------------------------------- pre-training sees the trials' train split

KONIQ_HEADER = '"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"'


def _koniq_without_official_split(tmp_path: Path, n: int = 12) -> str:
    """A tiny KonIQ-10k copy without the sets file, so the adapter draws a split from split_seed."""
    root = tmp_path / "koniq10k"
    (root / "1024x768").mkdir(parents=True)
    lines = [KONIQ_HEADER]
    for i in range(n):
        name = f"{10_000 + i}.jpg"
        Image.new("RGB", (40, 30), (10 * i, 255 - 10 * i, 60)).save(root / "1024x768" / name)
        lines.append(f'"{name}",1,2,50,40,7,100,{1 + 4 * i / (n - 1):.3f},0.5,{100 * i / (n - 1):.3f}')
    (root / "koniq10k_scores_and_distributions.csv").write_text("\n".join(lines) + "\n")
    return f"koniq10k:{root}"


class _Loaded(Exception):
    """Raised by the spy once the pre-training images are loaded: nothing after that is under test."""


def _images_pre_training_would_see(study, monkeypatch, root: Path) -> list[str]:
    import iqa_ray.ssl.data as ssl_data

    seen = []

    def spy(*args, **kwargs):
        seen.append(_REAL_LOAD_UNLABELLED(*args, **kwargs))
        raise _Loaded  # stop before Ray is needed

    monkeypatch.setattr(ssl_data, "load_unlabelled", spy)
    with pytest.raises(_Loaded):
        prepare_encoders(study, root=root, progress=lambda _m: None)
    return seen[0].names


def test_pre_training_sees_exactly_the_trials_training_photos_of_their_split_seed(tmp_path, monkeypatch):
    from iqa_ray.data.catalog import load_table

    spec, seed = _koniq_without_official_split(tmp_path), 3
    trials = load_table(spec, split_seed=seed)  # what every trial of the study trains, validates and tests on
    train = set(trials.loc[trials["split"] == "train", "image_id"])
    held_out = set(trials.loc[trials["split"] != "train", "image_id"])
    default = load_table(spec, split_seed=0)
    assert set(default.loc[default["split"] == "train", "image_id"]) != train, "seed 0 must draw another split"

    data = ssl_study(epochs=1)
    data["fixed"].update(dataset=spec, split_seed=seed)
    names = _images_pre_training_would_see(parse_study(data, name="s"), monkeypatch, tmp_path / "encoders")
    assert sorted(names) == sorted(train)
    assert not set(names) & held_out

    # [pretraining] source naming the training dataset again gets the same split: the same photos.
    data["pretraining"]["source"] = spec
    assert sorted(_images_pre_training_would_see(parse_study(data, name="s"), monkeypatch,
                                                 tmp_path / "encoders")) == sorted(train)


def test_an_encoder_cached_for_another_split_seed_is_not_reused(tmp_path, monkeypatch):
    spec = _koniq_without_official_split(tmp_path)
    data = ssl_study(epochs=1)
    data["fixed"].update(dataset=spec, split_seed=3)
    study = parse_study(data, name="s")
    config = study.pretrain_config("efficientnet_lite0")
    stale = encoder_dir(config, spec, ("train",), tmp_path / "encoders", split_seed=0)
    stale.mkdir(parents=True)
    (stale / "encoder.pt").write_bytes(b"pre-trained on the seed-0 split")
    # Not reused: pre-training starts by loading the seed-3 training photos.
    _images_pre_training_would_see(study, monkeypatch, tmp_path / "encoders")


def _search(argv: list[str], capsys) -> str:
    """``launch/tune_pretraining.py argv`` in this process (on the shared Ray instance); its stdout."""
    from iqa_ray.cli.tune import main

    code = main(argv, study="pretraining")
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_a_search_over_pretraining_pretrains_once_and_ssl_trials_start_from_the_encoder(tmp_path, monkeypatch, capsys,
                                                                                         shared_ray):
    # The shared data dir keeps the (smoke) embedded dataset other tests generated; the encoder
    # cache is this test's own, so the first search must pre-train.
    monkeypatch.setenv("IQA_RAY_ENCODERS", str(tmp_path / "encoders"))
    stdout = _search(["--smoke-test", "--searcher", "grid", "--num-samples", "1", "--storage", str(tmp_path / "results"),
                      "--name", "pt"], capsys)
    assert "[pretraining] " in stdout and "held-out ranking accuracy" in stdout
    assert "  pretraining = " in stdout  # the best config names the searched choice
    encoders = list((tmp_path / "encoders").glob("efficientnet_lite0-*/encoder.pt"))
    assert len(encoders) == 1
    record = json.loads((encoders[0].parent / "pretraining.json").read_text())
    assert record["splits"] == ["train"] and record["config"]["epochs"] == 1  # smoke: one epoch
    assert torch.load(encoders[0], weights_only=True)["format"] == "iqa-ray-encoder"
    info = json.loads((tmp_path / "results" / "pt" / "experiment.json").read_text())
    assert info["encoders"] == {"efficientnet_lite0": str(encoders[0].resolve())}

    trials = pd.read_parquet(tmp_path / "results" / "pt" / "trials.parquet")
    trials = trials[trials["kind"] == "search"]
    assert len(trials) == 4 and (trials.status == "TERMINATED").all()  # {none, ssl} x backbone_lr {1e-5, 1e-4}
    ssl = trials[trials["config.pretraining"] == "ssl"]
    none = trials[trials["config.pretraining"] == "none"]
    assert len(ssl) == len(none) == 2
    assert (ssl["config.pretrained_encoder"] == str(encoders[0].resolve())).all()
    assert none["config.pretrained_encoder"].isna().all()

    # the same search again reuses the encoder instead of pre-training it twice
    again = _search(["--smoke-test", "--num-samples", "1", "--searcher", "random", "--storage",
                     str(tmp_path / "results"), "--name", "pt2"], capsys)
    assert "reusing the efficientnet_lite0 encoder" in again and "pre-training 1 encoder" not in again
