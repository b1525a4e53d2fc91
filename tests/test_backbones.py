"""Backbones: NCHW maps sized by feature_info, weight sources, offline ImageNet weights, freezing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data, transform

from iqa_ray.core.net import hub_reachable
from iqa_ray.models import weights
from iqa_ray.models.backbones import SUPPORTED_BACKBONES, create_backbone
from iqa_ray.models.weights import create_classifier_efficientnet_lite0_offline, load_offline_efficientnet_lite0

FIXED_SIZE = {"vit_small_patch16_224", "swin_tiny_patch4_window7_224", "swin_base_patch4_window7_224"}
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small CPU models run no faster on two threads, and when the cores are shared with another
    # process, OpenMP threads spin-wait and run 10x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _imagenet_input(image: np.ndarray) -> torch.Tensor:
    """TF-Lite preprocessing the offline weights expect: 224 px, (x - 127) / 128."""
    resized = transform.resize(image, (224, 224), anti_aliasing=True, preserve_range=True).astype(np.float32)
    return torch.from_numpy((resized - 127.0) / 128.0).permute(2, 0, 1).unsqueeze(0)


def _unit_input(image: np.ndarray) -> torch.Tensor:
    resized = transform.resize(image, (224, 224), anti_aliasing=True, preserve_range=True).astype(np.float32)
    return torch.from_numpy(resized / 255.0).permute(2, 0, 1).unsqueeze(0)


@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
def test_every_backbone_returns_nchw_maps_sized_by_feature_info(name):
    size = 32 if name == "swin_base_patch4_window7_224" else 64  # keep the big Swin cheap
    backbone = create_backbone(name, pretrained="none", img_size=size if name in FIXED_SIZE else None)
    assert backbone.channels == list(backbone.body.feature_info.channels())
    assert backbone.img_size == (size if name in FIXED_SIZE else None)
    with torch.no_grad():
        maps = backbone(torch.rand(2, 3, size, size))
    assert len(maps) == len(backbone.channels) == len(backbone.reductions)
    for feature_map, channels, reduction in zip(maps, backbone.channels, backbone.reductions):
        assert feature_map.shape == (2, channels, size // reduction, size // reduction)


def test_backbone_normalises_unit_images_with_the_weights_mean_and_std():
    backbone = create_backbone("resnet18").eval()
    torch.testing.assert_close(backbone.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = backbone.body((images - backbone.mean) / backbone.std)
        got = backbone(images)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    offline = create_backbone("efficientnet_lite0", pretrained="offline")
    torch.testing.assert_close(offline.mean.flatten(), torch.full((3,), 127 / 255))
    torch.testing.assert_close(offline.std.flatten(), torch.full((3,), 128 / 255))


def test_fixed_size_backbone_rejects_other_sizes_with_a_hint():
    backbone = create_backbone("vit_small_patch16_224", img_size=32)
    with pytest.raises(ValueError, match="img_size=64"):
        backbone(torch.rand(1, 3, 64, 64))


def test_unknown_backbone_names_list_the_supported_ones():
    with pytest.raises(ValueError, match="is a timm model but not one iqa-ray supports.*resnet18"):
        create_backbone("convnext_tiny")
    with pytest.raises(ValueError, match="not a timm model name either.*swin_tiny_patch4_window7_224"):
        create_backbone("resnet1800")


@pytest.mark.parametrize("variant", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_offline_lite0_classifier_recognises_chelsea_and_coffee(variant):
    classifier = create_classifier_efficientnet_lite0_offline(variant)
    with torch.no_grad():
        cat = classifier(_imagenet_input(data.chelsea())).softmax(-1)[0]
        coffee = classifier(_imagenet_input(data.coffee())).softmax(-1)[0]
    assert int(cat.argmax()) in CAT_CLASSES
    assert float(cat[list(CAT_CLASSES)].sum()) > 0.8
    assert int(coffee.argmax()) == ESPRESSO
    assert {ESPRESSO, CUP, COFFEE_MUG} <= set(coffee.topk(5).indices.tolist())


def test_offline_backbone_carries_the_classifier_weights_and_its_normalisation():
    backbone = create_backbone("efficientnet_lite0", pretrained="efficientnet_lite0_offline").eval()
    classifier = create_classifier_efficientnet_lite0_offline()
    reference = classifier.state_dict()
    body = backbone.body.state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in body.items())
    # End to end: [0, 1] image -> Backbone (own normalisation) -> the classifier's head -> a cat.
    with torch.no_grad():
        last = backbone(_unit_input(data.chelsea()))[-1]
        logits = classifier.forward_head(classifier.bn2(classifier.conv_head(last)))
    assert int(logits.argmax()) in CAT_CLASSES


def test_offline_weights_refuse_other_models():
    with pytest.raises(ValueError, match="only for efficientnet_lite0"):
        create_backbone("resnet18", pretrained="offline")
    with pytest.raises(RuntimeError, match="296 tensors"):
        load_offline_efficientnet_lite0(timm.create_model("resnet18"))
    with pytest.raises(RuntimeError, match="does not line up"):
        load_offline_efficientnet_lite0(timm.create_model("efficientnet_lite0", num_classes=10))


def _assert_names_offline_options(message: str) -> None:
    assert '"none"' in message
    assert "efficientnet_lite0_offline" in message
    assert ".safetensors" in message and ".pth" in message


def test_hub_fails_at_once_when_hf_hub_offline_is_set(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE") as info:
        create_backbone("resnet18", pretrained="hub")
    assert time.monotonic() - start < 2.0
    _assert_names_offline_options(str(info.value))


def test_hub_fails_fast_through_the_socket_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # TEST-NET-1 (RFC 5737) is never routed: the probe fails here and on a networked machine alike.
    monkeypatch.setenv("HF_ENDPOINT", "https://192.0.2.1")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="192.0.2.1") as info:
        create_backbone("resnet18", pretrained="hub")
    assert time.monotonic() - start < 5.0
    _assert_names_offline_options(str(info.value))


def test_default_hub_probe_answers_within_its_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    start = time.monotonic()
    reachable, reason = hub_reachable(timeout_s=2.0)
    assert time.monotonic() - start < 3.0
    assert reachable or "huggingface.co" in reason


def _perturbed_state_dict(name: str, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))  # differ from any fresh random initialisation
    return model.state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tmp_path, suffix):
    state = _perturbed_state_dict("resnet18")
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    backbone = create_backbone("resnet18", pretrained=str(path))
    body = backbone.body.state_dict()
    assert set(body) <= set(state)
    for key, tensor in body.items():
        assert torch.equal(tensor, state[key]), key


def test_local_weights_round_trip_maps_swin_key_names(tmp_path):
    state = _perturbed_state_dict("swin_tiny_patch4_window7_224", img_size=32)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    backbone = create_backbone("swin_tiny_patch4_window7_224", pretrained=path, img_size=32)
    # features_only renames layers.0 to layers_0; the weights must still land in place.
    loaded = backbone.body.state_dict()["layers_0.blocks.0.attn.qkv.weight"]
    assert torch.equal(loaded, state["layers.0.blocks.0.attn.qkv.weight"])


def test_backbone_body_state_dict_round_trips(tmp_path):
    source = create_backbone("efficientnet_lite0", pretrained="offline")
    path = tmp_path / "body.pth"
    torch.save(source.body.state_dict(), path)
    loaded = create_backbone("efficientnet_lite0", pretrained=path)
    for key, tensor in source.body.state_dict().items():
        assert torch.equal(loaded.body.state_dict()[key], tensor), key


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_backbone("resnet18", pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match="'hbu'.*'none', 'hub'"):
        create_backbone("resnet18", pretrained="hbu")


def test_mismatched_weights_are_refused_with_a_few_keys(tmp_path):
    vit = tmp_path / "vit.safetensors"
    vit_state = timm.create_model("vit_small_patch16_224").state_dict()
    save_file({k: v.contiguous() for k, v in vit_state.items()}, str(vit))
    expected = r"missing keys: conv1\.weight.*\(120 in all\); unexpected keys: blocks\.0\..*\(152 in all\)"
    with pytest.raises(RuntimeError, match=expected):
        create_backbone("resnet18", pretrained=vit)

    state = _perturbed_state_dict("resnet18")
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    bad_shape = tmp_path / "bad_shape.pth"
    torch.save(state, bad_shape)
    with pytest.raises(RuntimeError, match=r"shape mismatches: conv1\.weight"):
        create_backbone("resnet18", pretrained=bad_shape)


def test_frozen_backbone_has_no_grad_and_keeps_batchnorm_in_eval():
    backbone = create_backbone("resnet18", frozen=True)
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    batchnorms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone(torch.rand(4, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # no running-stat drift

    trainable = create_backbone("resnet18").train()
    assert all(m.training for m in trainable.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_pretrained_must_be_a_string_or_path():
    with pytest.raises(TypeError, match="pretrained must be one of"):
        create_backbone("resnet18", pretrained=True)


def test_offline_weights_file_is_found_through_the_package():
    path = weights.offline_efficientnet_lite0_path()
    assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
