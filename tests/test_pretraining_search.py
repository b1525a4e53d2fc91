"""Searching `pretraining = none | ssl` (seed 004): the study, the encoder cache, a real search."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from iqa_ray.search.pretraining import encoder_dir, pretraining_source, prepare_encoders
from iqa_ray.search.study import StudyError, load_study, parse_study

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
    assert pretraining_source(study) == ("embedded", ("train",), False)
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
    folder = encoder_dir(config, "embedded", ("train",), tmp_path)
    folder.mkdir(parents=True)
    (folder / "encoder.pt").write_bytes(b"cached")
    messages = []
    assert prepare_encoders(study, root=tmp_path, progress=messages.append) == {
        "efficientnet_lite0": str((folder / "encoder.pt").resolve())}
    assert "reusing" in messages[0]
    # another pre-training config is another cache entry
    other = parse_study(ssl_study(epochs=3), name="s").pretrain_config("efficientnet_lite0")
    assert encoder_dir(other, "embedded", ("train",), tmp_path) != folder
    assert encoder_dir(config, "embedded", ("train", "val"), tmp_path) != folder


@pytest.mark.slow
def test_a_search_over_pretraining_pretrains_once_and_ssl_trials_start_from_the_encoder(tmp_path):
    # The shared data dir keeps the (smoke) embedded dataset other tests generated; the encoder
    # cache is this test's own, so the first search must pre-train.
    env = {**os.environ, "IQA_RAY_ENCODERS": str(tmp_path / "encoders")}
    cmd = [sys.executable, str(ROOT / "launch" / "tune_pretraining.py"), "--smoke-test", "--searcher", "grid",
           "--num-samples", "1", "--storage", str(tmp_path / "results"), "--name", "pt"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[pretraining] " in proc.stdout and "held-out ranking accuracy" in proc.stdout
    assert "  pretraining = " in proc.stdout  # the best config names the searched choice
    encoders = list((tmp_path / "encoders").glob("efficientnet_lite0-*/encoder.pt"))
    assert len(encoders) == 1
    record = json.loads((encoders[0].parent / "pretraining.json").read_text())
    assert record["splits"] == ["train"] and record["config"]["epochs"] == 1  # smoke: one epoch
    assert torch.load(encoders[0], weights_only=True)["format"] == "iqa-ray-encoder"
    info = json.loads((tmp_path / "results" / "pt" / "experiment.json").read_text())
    assert info["encoders"] == {"efficientnet_lite0": str(encoders[0].resolve())}

    trials = pd.read_parquet(tmp_path / "results" / "pt" / "trials.parquet")
    assert len(trials) == 4 and (trials.status == "TERMINATED").all()  # {none, ssl} x backbone_lr {1e-5, 1e-4}
    ssl = trials[trials["config.pretraining"] == "ssl"]
    none = trials[trials["config.pretraining"] == "none"]
    assert len(ssl) == len(none) == 2
    assert (ssl["config.pretrained_encoder"] == str(encoders[0].resolve())).all()
    assert none["config.pretrained_encoder"].isna().all()

    # the same search again reuses the encoder instead of pre-training it twice
    again_cmd = [sys.executable, str(ROOT / "launch" / "tune_pretraining.py"), "--smoke-test", "--num-samples", "1",
                 "--searcher", "random", "--storage", str(tmp_path / "results"), "--name", "pt2"]
    again = subprocess.run(again_cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the efficientnet_lite0 encoder" in again.stdout and "pre-training 1 encoder" not in again.stdout
