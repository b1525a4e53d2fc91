"""A model family is one file: its options and its model, registered in one call.

The family below is defined in this test file only, the way a user adds one: an options class (its
config keys, defaults and validation) and a model class, then ``register_family``. Nothing else is
edited, yet its keys are config keys, bad values are refused with the key named, and the training
engine trains it and rebuilds it from its checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from iqa_ray.core.options import ConfigError, Options, positive_int, require
from iqa_ray.models.base import IQAModel
from iqa_ray.models.gmm import GMMOptions
from iqa_ray.models.registry import FAMILIES, family, register_family, unregister_family
from iqa_ray.training.checkpoints import model_from_checkpoint
from iqa_ray.training.config import TrainConfig, valid_keys
from iqa_ray.training.engine import fit
from iqa_ray.training.loaders import load_decoded

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the new family (12 lines)
@dataclass(frozen=True)
class WideOptions(Options):
    width: int = 8

    def __post_init__(self) -> None:
        require(positive_int(self.width), f"width must be an integer >= 1, got {self.width!r}")


class WideIQA(IQAModel):
    """Last stage, globally pooled, through a two-layer head of ``width`` units."""

    def __init__(self, backbone, *, width: int = WideOptions.width, loss=None):
        super().__init__(backbone, loss=loss)
        self.head = nn.Sequential(nn.Linear(backbone.channels[-1], width), nn.GELU(), nn.Linear(width, 1))

    def forward_head(self, stages):
        return {"score": self.to_label_scale(self.head(stages[-1].mean(dim=(2, 3))).squeeze(1))}
# -----------------------------------------------------------------------------


@pytest.fixture
def wide():
    spec = register_family("wide", WideIQA, WideOptions)
    yield spec
    unregister_family("wide")
    assert "wide" not in FAMILIES and "width" not in valid_keys()


def config_for(tiny_dataset, **kw):
    return TrainConfig.from_dict({"dataset": str(tiny_dataset.path), "crop_size": 48, "batch_size": 8,
                                  "eval_batch_size": 32, "epochs": 1, "lr": 3e-3, "pretrained": "offline",
                                  "family": "wide", **kw})


def test_a_family_defined_in_a_test_file_registers_and_trains_for_an_epoch(tiny_dataset, wide, tmp_path):
    assert FAMILIES["wide"] is WideIQA and family("wide") is wide
    assert "width" in valid_keys()  # a config key, a --set key and a search-space parameter
    config = config_for(tiny_dataset, width=4)
    assert config.model.width == 4 and config.to_dict()["model"]["width"] == 4
    assert "hidden_dim" not in config.to_dict()["model"]  # other families' keys stay out of its record

    decoded = load_decoded(config)
    saved = {}
    result = fit(config, decoded, on_epoch_end=lambda e: saved.setdefault("path", e.save(tmp_path)))
    assert isinstance(result.model, WideIQA) and result.model.head[0].out_features == 4
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    assert math.isfinite(result.test["srcc"])
    # the engine rebuilds it from the checkpoint's config, with the same weights
    rebuilt, rebuilt_config = model_from_checkpoint(saved["path"])
    assert rebuilt_config == config and isinstance(rebuilt, WideIQA)
    for a, b in zip(rebuilt.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


def test_its_keys_are_validated_like_every_other_key(tiny_dataset, wide):
    with pytest.raises(ConfigError, match="width must be an integer >= 1, got 0"):
        config_for(tiny_dataset, width=0)
    with pytest.raises(ConfigError, match="n_clusters applies to family gmm only, not 'wide'"):
        config_for(tiny_dataset, n_clusters=4)
    with pytest.raises(ConfigError, match="width applies to family wide only, not 'mlp'"):
        config_for(tiny_dataset, family="mlp", width=4)
    # another family's key at its default is what a full record written earlier holds: accepted
    assert config_for(tiny_dataset, n_clusters=8).model.options == WideOptions()


def test_registration_refuses_what_would_make_a_key_mean_two_things():
    with pytest.raises(ValueError, match="'mlp' is already registered"):
        register_family("mlp", WideIQA, WideOptions)

    @dataclass(frozen=True)
    class Clash(Options):
        hidden_dim: int = 64  # the mlp and gmm families' hidden_dim defaults to 512

    class ClashIQA(WideIQA):
        def __init__(self, backbone, *, hidden_dim: int = 64, loss=None):
            super().__init__(backbone, width=hidden_dim, loss=loss)

    with pytest.raises(ValueError, match="option 'hidden_dim' defaults to 64, but family 'mlp' declares it with "
                                         "default 512"):
        register_family("clash", ClashIQA, Clash)
    with pytest.raises(ValueError, match=r"WideIQA does not take the options \['n_clusters', 'feature_dim'"):
        register_family("nope", WideIQA, GMMOptions)
    assert "clash" not in FAMILIES and "nope" not in FAMILIES
