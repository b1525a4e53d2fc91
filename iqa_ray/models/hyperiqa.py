"""HyperIQA: a hypernetwork that writes the weights of a per-image quality predictor.

Implements Su, Yan, Zhu, Zhang, Ge, Sun, Zhang, "Blindly Assess Image Quality in the Wild Guided
by a Self-Adaptive Hyper Network", CVPR 2020, with the multi-scale semantic fusion of the seed 002
experiments (Swin stages pooled to the last stage's size, concatenated, 1x1 conv).

Three parts, as in the paper:

* **Local distortion aware (LDA) module**: every backbone stage is reduced by a 1x1 conv, pooled
  to a small grid and mapped by a linear layer to a short vector (``lda_dim``); the last stage is
  globally pooled to the remaining ``target_in - (stages - 1) * lda_dim`` entries. Concatenated,
  these multi-scale vectors are the target network's input.
* **Hypernetwork**: the semantic features (last stage, or the fusion of all stages when
  ``multiscale=True``) are reduced by a 1x1 conv and pooled to a vector, from which linear layers
  generate the weights and biases of every target-network layer, per image.
* **Target network**: fully connected layers ``target_in -> target_sizes... -> 1`` with sigmoid
  activations, run with each image's own weights through batched matrix products.

Deviation from the paper, for any backbone and input size: the paper generates fully connected
weights with 3x3 convolutions over a 7x7 semantic map, which ties the hypernetwork to 224 px
ResNet-50 inputs; here the weights are generated from the pooled semantic vector by linear layers,
and every layer size comes from ``backbone.channels`` and the arguments. Generated weights are
scaled by 1/sqrt(fan-in) so target-network activations keep unit scale at any width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iqa_ray.core.options import Options, finite, positive_int, require
from iqa_ray.models.backbones import Backbone
from iqa_ray.models.base import IQAModel, ParamGroup
from iqa_ray.models.losses import RegressionLoss

__all__ = ["HyperIQA", "HyperIQAOptions"]


@dataclass(frozen=True)
class HyperIQAOptions(Options):
    """The ``hyperiqa`` family's config keys (see :class:`HyperIQA`; defaults: the paper's sizes).

    Attributes:
        multiscale: fuse all stages into the semantic features that feed the hypernetwork (seed 002).
        hyper_channels: width of the semantic vector the hypernetwork reads (paper: 112).
        target_in: input width of the target network (paper: 224).
        target_sizes: hidden widths of the target network (paper: 112, 56, 28, 14).
        lda_dim: output width of each lower stage's LDA branch (paper: 16).
        lda_channels: channels of the LDA branches' 1x1 convs.
        lda_grid: side of the grid the LDA branches pool to.
        hypernet_lr_mult: learning-rate multiplier of the hypernetwork group (paper: 10).
    """

    multiscale: bool = False
    hyper_channels: int = 112
    target_in: int = 224
    target_sizes: tuple[int, ...] = (112, 56, 28, 14)
    lda_dim: int = 16
    lda_channels: int = 16
    lda_grid: int = 4
    hypernet_lr_mult: float = 10.0

    def __post_init__(self) -> None:
        require(isinstance(self.multiscale, bool), f"multiscale must be true or false, got {self.multiscale!r}")
        for name in ("hyper_channels", "target_in", "lda_dim", "lda_channels", "lda_grid"):
            value = getattr(self, name)
            require(positive_int(value), f"{name} must be >= 1, got {value!r}")
        require(isinstance(self.target_sizes, tuple) and len(self.target_sizes) >= 1
                and all(positive_int(v) for v in self.target_sizes),
                f"target_sizes must be a list of integers >= 1, got {self.target_sizes!r}")
        require(finite(self.hypernet_lr_mult) and self.hypernet_lr_mult > 0,
                f"hypernet_lr_mult must be > 0, got {self.hypernet_lr_mult!r}")


class _LocalPool(nn.Module):
    """LDA branch for one stage: 1x1 conv -> adaptive average pool to grid x grid -> linear."""

    def __init__(self, in_channels: int, out_dim: int, *, reduce_channels: int, grid: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, reduce_channels, kernel_size=1, bias=False)
        self.grid = grid
        self.fc = nn.Linear(reduce_channels * grid * grid, out_dim)

    def forward(self, feature_map: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(self.reduce(feature_map), self.grid)
        return self.fc(pooled.flatten(1))


class HyperIQA(IQAModel):
    """HyperIQA on any backbone.

    Args:
        backbone: Feature extractor (ResNet, EfficientNet, ViT or Swin).
        multiscale: Fuse all stages into the semantic features that feed the hypernetwork.
        hyper_channels: Width of the semantic vector the hypernetwork reads (paper: 112).
        target_in: Input width of the target network (paper: 224).
        target_sizes: Hidden widths of the target network (paper: 112, 56, 28, 14).
        lda_dim: Output width of each lower stage's LDA branch (paper: 16).
        lda_channels: Channels of the LDA branches' 1x1 convs.
        lda_grid: Side of the grid the LDA branches pool to, keeping coarse spatial layout.
        hypernet_lr_mult: Learning-rate multiplier of the hypernetwork group (paper: 10).
        loss: Regression loss; L1 by default (the paper's loss).

    Outputs of ``forward``: ``"score"`` (B,), ``"features"`` (B, target_in) the target network's
    input (the LDA features).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        multiscale: bool = HyperIQAOptions.multiscale,
        hyper_channels: int = HyperIQAOptions.hyper_channels,
        target_in: int = HyperIQAOptions.target_in,
        target_sizes: tuple[int, ...] = HyperIQAOptions.target_sizes,
        lda_dim: int = HyperIQAOptions.lda_dim,
        lda_channels: int = HyperIQAOptions.lda_channels,
        lda_grid: int = HyperIQAOptions.lda_grid,
        hypernet_lr_mult: float = HyperIQAOptions.hypernet_lr_mult,
        loss: RegressionLoss | None = None,
    ) -> None:
        super().__init__(backbone, loss=loss)
        channels = backbone.channels
        target_sizes = tuple(target_sizes)
        HyperIQAOptions(multiscale=multiscale, hyper_channels=hyper_channels, target_in=target_in,
                        target_sizes=target_sizes, lda_dim=lda_dim, lda_channels=lda_channels, lda_grid=lda_grid,
                        hypernet_lr_mult=hypernet_lr_mult)  # validates (ConfigError names the key)
        last_dim = target_in - (len(channels) - 1) * lda_dim
        if last_dim < 1:
            raise ValueError(
                f"target_in={target_in} leaves no room for the last stage: {len(channels) - 1} lower "
                f"stages already take {len(channels) - 1} x lda_dim={lda_dim}; raise target_in or lower lda_dim"
            )
        self.multiscale = multiscale
        self.hypernet_lr_mult = float(hypernet_lr_mult)
        self.layer_sizes = (target_in, *(int(s) for s in target_sizes), 1)

        # LDA: the target network's input, from every stage.
        self.lda = nn.ModuleList(
            _LocalPool(c, lda_dim, reduce_channels=lda_channels, grid=lda_grid) for c in channels[:-1]
        )
        self.lda_last = nn.Linear(channels[-1], last_dim)

        # Hypernetwork: semantic features -> weights and biases of every target layer.
        self.fusion = nn.Conv2d(sum(channels), channels[-1], kernel_size=1) if multiscale else None
        self.hyper_reduce = nn.Sequential(nn.Conv2d(channels[-1], hyper_channels, kernel_size=1), nn.ReLU())
        pairs = list(zip(self.layer_sizes[:-1], self.layer_sizes[1:]))
        self.weight_generators = nn.ModuleList(nn.Linear(hyper_channels, n_in * n_out) for n_in, n_out in pairs)
        self.bias_generators = nn.ModuleList(nn.Linear(hyper_channels, n_out) for _, n_out in pairs)
        # The last target layer writes the standardised score: start it near 0 (= label mean).
        for generator in (self.weight_generators[-1], self.bias_generators[-1]):
            nn.init.normal_(generator.weight, std=1e-3)
            nn.init.zeros_(generator.bias)

    def _semantic(self, stages: list[Tensor]) -> Tensor:
        last = stages[-1]
        if self.fusion is None:
            return last
        size = last.shape[-2:]
        pooled = [F.adaptive_avg_pool2d(s, size) for s in stages[:-1]]
        return self.fusion(torch.cat([*pooled, last], dim=1))

    def forward_head(self, stages: list[Tensor]) -> dict[str, Tensor]:
        local = [branch(s) for branch, s in zip(self.lda, stages[:-1])]
        local.append(self.lda_last(stages[-1].mean(dim=(2, 3))))
        target_input = torch.cat(local, dim=1)

        hyper = self.hyper_reduce(self._semantic(stages)).mean(dim=(2, 3))
        x = target_input.unsqueeze(2)  # (B, n_in, 1): one column vector per image
        n_layers = len(self.weight_generators)
        for index, (make_weight, make_bias) in enumerate(zip(self.weight_generators, self.bias_generators)):
            n_in, n_out = self.layer_sizes[index], self.layer_sizes[index + 1]
            weight = make_weight(hyper).view(-1, n_out, n_in) / math.sqrt(n_in)
            x = torch.bmm(weight, x) + make_bias(hyper).unsqueeze(2)
            if index < n_layers - 1:
                x = torch.sigmoid(x)
        standardised = x.view(-1)
        return {"score": self.to_label_scale(standardised), "features": target_input}

    def _head_groups(self, lr: float) -> list[ParamGroup]:
        hypernet = [
            *self.hyper_reduce.parameters(),
            *self.weight_generators.parameters(),
            *self.bias_generators.parameters(),
        ]
        if self.fusion is not None:
            hypernet.extend(self.fusion.parameters())
        return [{"name": "hypernet", "params": hypernet, "lr": lr * self.hypernet_lr_mult}]

    def extra_repr(self) -> str:
        return (
            f"multiscale={self.multiscale}, layer_sizes={self.layer_sizes}, "
            f"hypernet_lr_mult={self.hypernet_lr_mult}, {super().extra_repr()}"
        )
