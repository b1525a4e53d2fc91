"""The frozen-feature pass's layout and precision: channels_last gives today's features within float32
rounding, bf16 is an option used by ``auto`` only where the CPU computes it natively."""

import numpy as np
import pytest
import torch

from iqa_ray.core.options import ConfigError
from iqa_ray.training.build import inference_memory_format
from iqa_ray.training.config import TrainConfig
from iqa_ray.training.device import cpu_bf16_native, feature_autocast_dtype
from iqa_ray.training.features import cache_key, cache_keys, compute_features
from iqa_ray.training.loaders import load_decoded

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
# /proc/cpuinfo excerpts: an AMD EPYC (Zen 4) with AVX512-BF16, a Sapphire Rapids with AMX, an older Xeon without
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nbogomips\t: 4800\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


def config_for(tiny_dataset, **kw):
    base = {"dataset": str(tiny_dataset.path), "crop_size": 32, "whole_image": True, "feature_cache": True,
            "family": "mlp", "pooling": "every_block", "reference_blur": 2.0, "frozen_backbone": True,
            "pretrained": "offline", "hidden_dim": 32, "hflip": True, "amp": False}
    return TrainConfig.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def decoded(tiny_dataset):
    return load_decoded(config_for(tiny_dataset))


@pytest.mark.parametrize("cpuinfo, native", [(ZEN4, True), (SAPPHIRE, True), (SKYLAKE, False), ("", False)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert cpu_bf16_native(cpuinfo) is native


def test_auto_feature_dtype_is_bf16_only_where_the_device_computes_it_natively():
    assert feature_autocast_dtype("auto", CPU, bf16_native=True) is torch.bfloat16
    assert feature_autocast_dtype("auto", CPU, bf16_native=False) is None
    assert feature_autocast_dtype("auto", torch.device("cuda"), bf16_native=False) is None
    # without an override, this machine's own flags decide
    assert (feature_autocast_dtype("auto", CPU) is torch.bfloat16) is cpu_bf16_native()
    assert feature_autocast_dtype("float32", CPU, bf16_native=True) is None
    assert feature_autocast_dtype("bf16", CPU, bf16_native=False) is torch.bfloat16


def test_a_bad_feature_dtype_is_refused_naming_the_valid_ones(tiny_dataset):
    with pytest.raises(ConfigError, match=r"feature_dtype must be one of float32, bf16, auto, got 'fp8'"):
        config_for(tiny_dataset, feature_dtype="fp8")


def test_channels_last_is_the_feature_pass_layout_of_cnn_backbones_only(tiny_dataset):
    assert inference_memory_format(config_for(tiny_dataset)) is torch.channels_last
    assert inference_memory_format(config_for(tiny_dataset, channels_last=False)) is None
    assert inference_memory_format(config_for(tiny_dataset, backbone="vit_small_patch16_224", pretrained="none",
                                              pooling="last")) is None


def test_channels_last_features_equal_nchw_ones_within_float32_rounding(tiny_dataset, decoded):
    nchw = compute_features(decoded, config_for(tiny_dataset, channels_last=False))
    nhwc = compute_features(decoded, config_for(tiny_dataset))
    assert nhwc.key == nchw.key  # the layout does not change what the cache holds
    scale = np.abs(nchw.plain).max()
    np.testing.assert_allclose(nhwc.plain, nchw.plain, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(nhwc.flipped, nchw.flipped, rtol=0, atol=1e-5 * scale)
    assert not np.array_equal(nhwc.plain[:, :8], -nchw.plain[:, :8])  # sanity: not trivially zero


def test_bf16_features_are_float32_close_to_float32_ones_and_keyed_apart(tiny_dataset, decoded):
    fp32 = compute_features(decoded, config_for(tiny_dataset))
    bf16 = compute_features(decoded, config_for(tiny_dataset, feature_dtype="bf16"))
    assert bf16.plain.dtype == np.float32 and bf16.plain.shape == fp32.plain.shape
    assert not np.array_equal(bf16.plain, fp32.plain)  # the backbone really ran in bf16
    # bf16 keeps 8 bits of mantissa: per feature, within a few percent of the features' spread
    spread = fp32.plain.std(axis=0) + 1e-3
    assert np.median(np.abs(bf16.plain - fp32.plain) / spread) < 0.05
    corr = np.corrcoef(bf16.plain.ravel(), fp32.plain.ravel())[0, 1]
    assert corr > 0.999
    # a cache of bf16 features is not the float32 one: a run checks which it was given
    assert bf16.key != fp32.key and "feature_dtype=bf16" in bf16.key
    with pytest.raises(ValueError, match="feature cache computed for"):
        bf16.check(config_for(tiny_dataset), len(fp32.plain))
    assert "feature_dtype" in cache_keys() and cache_key(config_for(tiny_dataset)) == fp32.key


@pytest.mark.parametrize("name, pretrained", [("efficientnet_lite0", "offline"), ("resnet18", "none"),
                                             ("efficientnet_b0", "none"), ("resnet50", "none")])
def test_folded_batchnorms_give_the_unfolded_backbones_maps(name, pretrained):
    import copy

    from iqa_ray.models.backbones import create_backbone, fold_batchnorm
    from iqa_ray.training.inference import check_folded

    backbone = create_backbone(name, pretrained=pretrained, frozen=True).eval()
    torch.manual_seed(0)
    for bn in (m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics that matter
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    # in float64 the fold is exact (up to float64 rounding): it follows the dataflow of every block
    backbone = backbone.double()
    unfolded = copy.deepcopy(backbone)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert fold_batchnorm(backbone) == n_bn and n_bn > 10  # every one of them
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    images = torch.rand(2, 3, 96, 128, dtype=torch.float64)
    with torch.inference_mode():
        for got, want in zip(backbone(images), unfolded(images), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))
        check_folded(SimpleModel(backbone), unfolded, images[:1])
        with torch.no_grad():  # a fold that does not match the dataflow is caught
            next(m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)).bias.add_(1.0)
        with pytest.raises(AssertionError, match=f"folding the BatchNorms of {name} changed its features"):
            check_folded(SimpleModel(backbone), unfolded, images[:1])


class SimpleModel:
    def __init__(self, backbone):
        self.backbone = backbone


def test_only_a_frozen_backbone_in_eval_mode_is_folded():
    from iqa_ray.models.backbones import create_backbone, fold_batchnorm

    with pytest.raises(ValueError, match="frozen backbone in eval mode"):
        fold_batchnorm(create_backbone("resnet18", pretrained="none", frozen=False).eval())
