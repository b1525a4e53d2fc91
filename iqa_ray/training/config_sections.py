"""The three sections of a run's config: what data it sees, which model it trains, how it is optimised.

Each section is a frozen dataclass on the config base (:class:`iqa_ray.core.options.Options`),
validated when it is built, so a bad value fails before any work starts with a
:class:`~iqa_ray.core.options.ConfigError` naming the key and what is valid. Every field name is
unique across the three: :class:`iqa_ray.training.config.TrainConfig` holds one of each and routes
flat keys to them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from iqa_ray.core.options import Options, finite, require
from iqa_ray.data.labels import LABELS
from iqa_ray.models.backbones import FEATURE_STAGES, SUPPORTED_BACKBONES
from iqa_ray.models.losses import LOSSES
from iqa_ray.models.registry import FAMILIES, family, family_keys
from iqa_ray.models.weights import DEFAULT_BACKBONE, DEFAULT_PRETRAINED

__all__ = ["AMP_MODES", "FEATURE_DTYPES", "LR_SCHEDULES", "OPTIMIZERS", "PATCH_PLACEMENTS", "SELECT_EPOCHS", "DataConfig", "ModelConfig",
           "OptimConfig", "validation_chooser"]

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine", "step", "plateau", "none")  # OptimConfig.lr_schedule (trial schedulers: search.study)
# Mixed precision: "auto" (also written true) = bfloat16 on CUDA devices that have it, float16 with a
# gradient scaler on those that do not (V100, T4), off on CPU; "bf16" / "fp16" force that dtype on every
# device, CPU included (how the tests run the path a GPU runs); "off" (also false) = float32.
AMP_MODES = ("auto", "bf16", "fp16", "off")
FEATURE_DTYPES = ("float32", "bf16", "auto")
PATCH_PLACEMENTS = ("grid", "random")
SELECT_EPOCHS = ("best", "last")


def validation_chooser(optim: Any) -> str | None:
    """What in a run's optimisation settings chooses on validation photos (``None``: nothing, so a
    refit on training and validation photos, ``train_on_val``, is sound)."""
    if optim.select_epoch != "last":
        return f"select_epoch = {optim.select_epoch!r}"
    if optim.early_stopping_patience is not None:
        return "early_stopping_patience"
    if optim.lr_schedule == "plateau":
        return "lr_schedule = 'plateau'"
    return None


@dataclass(frozen=True)
class DataConfig(Options):
    """What data a run sees and how it is cropped and batched.

    Attributes:
        dataset: ``embedded``, a pre-generated folder, or ``<adapter>:<root>`` (see
            :mod:`iqa_ray.data.catalog`).
        label: label column of pre-generated data (``severity`` or ``ssim``).
        crop_size: training crop and evaluation patch side, in pixels.
        eval_patches: deterministic evaluation patches per image on a fixed grid, whose scores
            are averaged (1 = centre crop; seed 002 averaged 20 test patches).
        image_size: resize every image to (width, height) when decoding (real datasets; the
            seeds used 512x384 for KonIQ-10k); ``None`` keeps sizes.
        short_side: resize every image, aspect preserved, so that its shorter side is this many
            pixels when decoding (phone photos of mixed sizes, SPAQ's 512); exclusive with
            ``image_size``.
        whole_image: the model sees each whole image at its decoded size, for training (with a
            random horizontal flip unless ``hflip`` is false) and evaluation, instead of
            ``crop_size`` crops (the frozen feature recipe; a linear probe's input).
        hflip: training samples (crops, whole images, or with ``feature_cache`` each draw of an
            image's cached features) are mirrored left-right with odds 1/2; ``False`` trains on
            the images as they are, and a feature cache then skips the mirror images' backbone
            passes (half its cost). Evaluation never flips.
        patches_per_image: training samples drawn from each image per epoch (HyperIQA: 25 random
            224 px patches per image per epoch); an epoch is that many passes over the images.
        patch_placement: where evaluation patches go: ``grid`` (evenly spaced, the default) or
            ``random`` (seeded per image by ``split_seed`` and the image's row, so evaluating twice
            gives the same patches, as HyperIQA's test protocol with a fixed seed).
        batch_size: training batch size.
        eval_batch_size: images per evaluation batch.
        num_workers: DataLoader worker processes (0 = in the training process); ``None`` = sized
            from the run's CPU share: 0 on CPU (the trial's threads compute), ``cpus - 1`` (at least
            1, at most 8) on a GPU, whose step must not wait for crops. Workers are persistent and
            read the decoded images in place (forked, never a copy of the cache).
        prefetch_factor: batches each worker prepares ahead (with ``num_workers`` > 0).
        eval_chunk: at most this many patches per evaluation forward pass (25 test patches of 64
            images would be 1,600 at once: a trial sharing a GPU must not spike its memory).
        label_fraction: fraction of training *groups* (source photos) whose labels are used
            (the 10% / 100% label budgets of the pre-training study); val/test are untouched.
        split_seed: seed of seeded splits of real datasets.
        split_fractions: (train, val, test) fractions of source photos for the seeded split of a
            real dataset; ``None`` = the adapter's default (0.7 / 0.1 / 0.2).
        feature_cache: with a frozen backbone, compute the backbone's pooled features of every
            image once and train the head on them (``whole_image`` only; the family must pool,
            i.e. ``mlp``). Exactly the model a forward pass on images gives, at a fraction of the
            cost per epoch; a search shares one cache between all its trials.
        skip_bad_rows: a real dataset's bad rows (a score that is missing or not valid, a missing
            image file, an image that cannot be read) are left out of every split and listed,
            instead of stopping the run with one error that names them all. Part of the config, so
            everything that re-reads the run's data (re-training on other splits, the notebooks,
            evaluation) leaves the same rows out; a search's ``--skip-bad-rows``.
    """

    dataset: str = "embedded"
    label: str = "severity"
    crop_size: int = 128
    eval_patches: int = 4
    image_size: tuple[int, int] | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    num_workers: int | None = None
    label_fraction: float = 1.0
    split_seed: int = 0
    split_fractions: tuple[float, float, float] | None = None
    short_side: int | None = None
    whole_image: bool = False
    patches_per_image: int = 1
    patch_placement: str = "grid"
    feature_cache: bool = False
    prefetch_factor: int = 4
    hflip: bool = True
    eval_chunk: int = 64
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.dataset, str) and self.dataset != "", "dataset must be a non-empty string")
        require(self.label in LABELS, f"label must be one of {LABELS}, got {self.label!r}")
        require(isinstance(self.crop_size, int) and 16 <= self.crop_size <= 2048,
                f"crop_size must be an integer in [16, 2048], got {self.crop_size!r}")
        require(isinstance(self.eval_patches, int) and self.eval_patches >= 1,
                f"eval_patches must be an integer >= 1, got {self.eval_patches!r}")
        if self.image_size is not None:
            size = tuple(self.image_size)
            require(len(size) == 2 and all(isinstance(v, int) and v >= self.crop_size for v in size),
                    f"image_size must be (width, height), each >= crop_size {self.crop_size}, got {self.image_size!r}")
            object.__setattr__(self, "image_size", size)
        require(isinstance(self.batch_size, int) and self.batch_size >= 2,
                f"batch_size must be an integer >= 2 (ranking pairs need two images), got {self.batch_size!r}")
        require(isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1,
                f"eval_batch_size must be an integer >= 1, got {self.eval_batch_size!r}")
        require(self.num_workers is None or (isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool)
                                             and self.num_workers >= 0),
                f"num_workers must be an integer >= 0 or None (sized from the CPU share), got {self.num_workers!r}")
        require(isinstance(self.prefetch_factor, int) and self.prefetch_factor >= 1,
                f"prefetch_factor must be an integer >= 1, got {self.prefetch_factor!r}")
        require(isinstance(self.eval_chunk, int) and self.eval_chunk >= 1,
                f"eval_chunk must be an integer >= 1 (patches per evaluation forward pass), got {self.eval_chunk!r}")
        require(finite(self.label_fraction) and 0 < self.label_fraction <= 1,
                f"label_fraction must be in (0, 1], got {self.label_fraction!r}")
        require(isinstance(self.split_seed, int) and not isinstance(self.split_seed, bool),
                f"split_seed must be an integer, got {self.split_seed!r}")
        if self.split_fractions is not None:
            parts = tuple(self.split_fractions)
            require(len(parts) == 3 and all(finite(v) and v >= 0 for v in parts) and abs(sum(parts) - 1) < 1e-6
                    and parts[0] > 0 and parts[1] > 0,
                    "split_fractions must be (train, val, test), each >= 0 with train and val > 0, summing to 1, "
                    f"got {self.split_fractions!r}")
            object.__setattr__(self, "split_fractions", tuple(float(v) for v in parts))
        require(self.short_side is None or (isinstance(self.short_side, int) and self.short_side >= self.crop_size),
                f"short_side must be None or an integer >= crop_size {self.crop_size}, got {self.short_side!r}")
        require(self.short_side is None or self.image_size is None,
                f"image_size {self.image_size!r} and short_side {self.short_side!r} both resize at decode; set one")
        require(isinstance(self.whole_image, bool), f"whole_image must be true or false, got {self.whole_image!r}")
        require(isinstance(self.patches_per_image, int) and self.patches_per_image >= 1,
                f"patches_per_image must be an integer >= 1, got {self.patches_per_image!r}")
        require(self.patch_placement in PATCH_PLACEMENTS,
                f"patch_placement must be one of {PATCH_PLACEMENTS}, got {self.patch_placement!r}")
        require(isinstance(self.hflip, bool), f"hflip must be true or false, got {self.hflip!r}")
        require(isinstance(self.feature_cache, bool), f"feature_cache must be true or false, got {self.feature_cache!r}")
        require(isinstance(self.skip_bad_rows, bool), f"skip_bad_rows must be true or false, got {self.skip_bad_rows!r}")
        require(not self.feature_cache or self.whole_image,
                "feature_cache caches whole-image features: it needs whole_image = true")


@dataclass(frozen=True)
class ModelConfig(Options):
    """Which model is trained and with which loss.

    The keys every family shares are fields here; each family's own keys (``hidden_dim``,
    ``n_clusters``, ``multiscale``, ...) are its options class's fields, declared next to its model
    and registered with it (:func:`iqa_ray.models.registry.register_family`), held in ``options``
    and readable as attributes (``config.model.hidden_dim``).

    Attributes:
        family: a registered family: ``mlp``, ``gmm``, ``hyperiqa`` (see ``iqa_ray.models.registry.FAMILIES``).
        backbone: a timm backbone (see ``iqa_ray.models.backbones.SUPPORTED_BACKBONES``).
        pretrained: ``none``, ``hub``, ``offline`` (EfficientNet-Lite0 ImageNet weights shipped in
            a pip package) or a path to a weights file.
        pretrained_encoder: an ``iqa-ray-encoder`` file (``iqa-ray pretrain``) loaded
            into the backbone after it is built, replacing the ``pretrained`` weights; fine-tune
            it with a smaller ``backbone_lr`` than the head's ``lr`` (seed 004: 1e-5 vs 1e-4).
        frozen_backbone: freeze the backbone (seed 001's ``resnet18_frozen``).
        trainable_stages: train only the last this many of the backbone's feature stages (the
            "frozen depth": 1 = the last stage only; earlier stages keep their weights and
            BatchNorm statistics); ``None`` = every stage trains (unless ``frozen_backbone``).
        img_size: input size of fixed-size backbones (ViT, Swin); defaults to ``crop_size``.
        loss: ``l1``, ``mse`` or ``ranking``.
        alpha: ranking-loss weight in ``(1 - alpha) * L1 + alpha * L_rank``, in [0, 1].
        margin: ranking-loss margin on the 0-100 MOS scale, >= 0.
        options: the family's options (an instance of its options class, or a mapping of its keys;
            ``None``: every default): :class:`~iqa_ray.models.mlp.MLPOptions`,
            :class:`~iqa_ray.models.gmm.GMMOptions`, :class:`~iqa_ray.models.hyperiqa.HyperIQAOptions`.
    """

    family: str = "hyperiqa"
    backbone: str = DEFAULT_BACKBONE
    pretrained: str = DEFAULT_PRETRAINED
    pretrained_encoder: str | None = None
    frozen_backbone: bool = False
    trainable_stages: int | None = None
    img_size: int | None = None
    loss: str = "l1"
    alpha: float = 0.0
    margin: float = 0.5
    options: Any = None

    def __post_init__(self) -> None:
        require(self.family in FAMILIES, f"unknown model family {self.family!r}; valid: {', '.join(FAMILIES)}")
        kind = family(self.family).options
        if not isinstance(self.options, kind):
            require(self.options is None or isinstance(self.options, Mapping),
                    f"options of family {self.family!r} must be a {kind.__name__} or a mapping of its keys "
                    f"{list(kind.names())}, got {self.options!r}")
            object.__setattr__(self, "options", kind.from_dict(self.options, what=f"family {self.family!r}"))
        require(self.backbone in SUPPORTED_BACKBONES,
                f"unknown backbone {self.backbone!r}; valid: {', '.join(SUPPORTED_BACKBONES)}")
        require(isinstance(self.pretrained, str) and self.pretrained != "", "pretrained must be a non-empty string")
        require(self.pretrained_encoder is None or (isinstance(self.pretrained_encoder, str)
                                                    and os.path.isfile(os.path.expanduser(self.pretrained_encoder))),
                f"pretrained_encoder must be None or an existing encoder file, got {self.pretrained_encoder!r}")
        require(self.loss in LOSSES, f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        require(finite(self.alpha) and 0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha!r}")
        require(finite(self.margin) and self.margin >= 0, f"margin must be >= 0, got {self.margin!r}")
        require(self.trainable_stages is None or (isinstance(self.trainable_stages, int)
                                                  and not isinstance(self.trainable_stages, bool)
                                                  and self.trainable_stages >= 0),
                f"trainable_stages must be None (every stage trains) or an integer >= 0, got {self.trainable_stages!r}")
        require(self.trainable_stages is None or self.trainable_stages <= FEATURE_STAGES[self.backbone],
                f"trainable_stages must be at most {FEATURE_STAGES[self.backbone]} for {self.backbone} (its feature "
                f"stages), got {self.trainable_stages!r}")
        require(self.trainable_stages is None or not self.frozen_backbone,
                "trainable_stages with frozen_backbone = true: a frozen backbone trains no stage; set one of them")
        require(self.img_size is None or (isinstance(self.img_size, int) and self.img_size >= 16),
                f"img_size must be None or an integer >= 16, got {self.img_size!r}")
        if self.loss != "ranking":
            require(self.alpha == 0.0, f"alpha={self.alpha} only applies to loss='ranking' (loss is {self.loss!r})")

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: the family's options read as attributes.
        if name.startswith("_") or name == "options":  # unpickling asks before options exists
            raise AttributeError(name)
        options = self.options
        if isinstance(options, Options) and name in options.names():
            return getattr(options, name)
        takers = family_keys().get(name)
        if takers:
            raise AttributeError(f"{name!r} is an option of family {'/'.join(takers)}, not of {self.family!r}")
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def family_kwargs(self, *, seed: int | None = None) -> dict[str, Any]:
        """The family-specific arguments of this config's family (its options).

        Args:
            seed: the run's seed (``OptimConfig.seed``); given, it becomes the ``random_state`` of
                families that take one (the GMM's EM initialisation), so that runs with different
                seeds differ in their mixture fit too, not only in their weights and batches.
        """
        kwargs = self.options.to_dict()
        if seed is not None and family(self.family).seeded:
            # scikit-learn takes seeds in [0, 2**32); the engine's seed_everything reduces the same way.
            kwargs["random_state"] = seed % 2**32
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """Flat plain data: the shared fields, then the family's options."""
        shared = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**shared, **self.options.to_dict()}

    def loss_kwargs(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "margin": self.margin} if self.loss == "ranking" else {}


@dataclass(frozen=True)
class OptimConfig(Options):
    """How a run is optimised.

    Attributes:
        epochs: training epochs (an upper bound under early stopping or a Tune scheduler).
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        lr: learning rate of the head (HyperIQA's hypernetwork gets ``lr * hypernet_lr_mult``).
        backbone_lr: learning rate of the backbone; ``None`` means ``lr * backbone_lr_mult``.
        backbone_lr_mult: backbone LR as a fraction of ``lr`` when ``backbone_lr`` is None.
        weight_decay: decoupled for AdamW, L2 for Adam/SGD.
        momentum: SGD momentum.
        lr_schedule: ``cosine``, ``step``, ``plateau`` or ``none`` (the learning-rate schedule of
            one run; a search's trial scheduler, ASHA, is a study's ``trial_scheduler``). The old
            key ``scheduler`` is still read, with a deprecation message.
        t_max: cosine period in epochs (default: the run's epochs).
        eta_min: cosine floor, as a fraction of each group's base LR.
        step_size, gamma: step schedule (every ``step_size`` epochs multiply by ``gamma``).
        plateau_patience, plateau_factor: reduce-on-plateau on validation SRCC.
        warmup_epochs: linear warm-up from 0 over this many epochs (fractions allowed).
        grad_clip: clip the global gradient norm to this (``None`` = off).
        amp: mixed precision of the backbone: ``"auto"`` (or ``True``) = bfloat16 autocast on
            CUDA devices that support it, float16 with a gradient scaler on those that do not
            (V100, T4), off on CPU; ``"bf16"`` / ``"fp16"`` = that dtype on every device, CPU
            included (how the tests run the paths a GPU runs; fp16 always with the scaler);
            ``"off"`` (or ``False``) = float32. Heads, scores, losses and metrics are float32
            either way.
        finite_check_every: check that the loss is finite every this many steps and at the end
            of every epoch (each check waits for the device; the error still names the epoch
            and step where the loss first went non-finite).
        channels_last: NHWC memory layout for CNN backbones: in training on CUDA (faster
            convolutions with tensor cores), and in the frozen-feature pass on every device (about
            2x faster on CPU); ignored for transformers.
        feature_dtype: precision of the frozen backbone in the feature pass (``feature_cache``):
            ``"float32"``; ``"bf16"`` (bfloat16 autocast on every device; the pooling stays
            float32); ``"auto"`` = bf16 on CUDA devices that support it and on CPUs that compute
            bfloat16 natively (AVX512-BF16 or AMX, read from the CPU's flags at run time), float32
            elsewhere (where bf16 autocast would be emulated, and slower).
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithms (fixed input sizes).
        tf32: TensorFloat-32 matmuls and convolutions on CUDA devices that have them.
        fused_optimizer: the fused implementation of Adam/AdamW where every parameter is on CUDA
            (one kernel launch per step) or every one on the CPU (one vectorised loop per step).
        checkpoint_every: write a checkpoint every this many epochs (and always at the last
            one and where a scheduler may stop the trial); a killed trial resumes from the
            newest and repeats at most ``checkpoint_every - 1`` epochs, exactly as they ran.
        seed: seed of initialisation, shuffling and augmentation.
        early_stopping_patience: stop after this many epochs without a better validation SRCC
            (standalone runs; under Tune the scheduler stops trials). ``None`` = off.
        select_epoch: which weights a run hands back: ``best`` (the epoch with the best
            validation SRCC) or ``last`` (the final epoch, a rule that cannot overfit a small
            validation split by picking among epochs; its validation metrics are the last epoch's).
        train_on_val: train on the training and the validation photos (a refit: the final model of
            a configuration already selected, as ``--splits`` re-trains it). Allowed only where
            nothing in the run is chosen on validation (``select_epoch = "last"``, no
            ``early_stopping_patience``, an ``lr_schedule`` other than ``plateau``); the validation
            metrics it reports are then measured on photos it trained on.
    """

    epochs: int = 10
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr: float | None = None
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    t_max: int | None = None
    eta_min: float = 0.01
    step_size: int = 6
    gamma: float = 0.1
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    warmup_epochs: float = 0.0
    grad_clip: float | None = 5.0
    amp: bool | str = True
    seed: int = 0
    early_stopping_patience: int | None = None
    select_epoch: str = "best"
    train_on_val: bool = False
    finite_check_every: int = 50
    channels_last: bool = True
    feature_dtype: str = "float32"
    cudnn_benchmark: bool = True
    tf32: bool = True
    fused_optimizer: bool = True
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        require(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        require(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        require(self.lr_schedule in LR_SCHEDULES,
                f"unknown lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        require(finite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        require(self.backbone_lr is None or (finite(self.backbone_lr) and self.backbone_lr >= 0),
                f"backbone_lr must be None or >= 0, got {self.backbone_lr!r}")
        require(finite(self.backbone_lr_mult) and self.backbone_lr_mult >= 0,
                f"backbone_lr_mult must be >= 0, got {self.backbone_lr_mult!r}")
        require(finite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        require(finite(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        require(self.t_max is None or (isinstance(self.t_max, int) and self.t_max >= 1),
                f"t_max must be None or an integer >= 1, got {self.t_max!r}")
        require(finite(self.eta_min) and 0 <= self.eta_min <= 1, f"eta_min must be in [0, 1], got {self.eta_min!r}")
        require(isinstance(self.step_size, int) and self.step_size >= 1, f"step_size must be >= 1, got {self.step_size!r}")
        require(finite(self.gamma) and 0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma!r}")
        require(isinstance(self.plateau_patience, int) and self.plateau_patience >= 0,
                f"plateau_patience must be >= 0, got {self.plateau_patience!r}")
        require(finite(self.plateau_factor) and 0 < self.plateau_factor < 1,
                f"plateau_factor must be in (0, 1), got {self.plateau_factor!r}")
        require(finite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
                f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs!r}")
        require(self.grad_clip is None or (finite(self.grad_clip) and self.grad_clip > 0),
                f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        require(isinstance(self.amp, bool) or self.amp in AMP_MODES,
                f"amp must be one of {', '.join(AMP_MODES)} (or true / false), got {self.amp!r}")
        require(self.feature_dtype in FEATURE_DTYPES,
                f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.feature_dtype!r}")
        for key in ("channels_last", "cudnn_benchmark", "tf32", "fused_optimizer"):
            require(isinstance(getattr(self, key), bool), f"{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("finite_check_every", "checkpoint_every"):
            value = getattr(self, key)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"{key} must be an integer >= 1, got {value!r}")
        require(self.early_stopping_patience is None or
                (isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 1),
                f"early_stopping_patience must be None or >= 1, got {self.early_stopping_patience!r}")
        require(self.select_epoch in SELECT_EPOCHS,
                f"select_epoch must be one of {SELECT_EPOCHS}, got {self.select_epoch!r}")
        require(isinstance(self.train_on_val, bool), f"train_on_val must be true or false, got {self.train_on_val!r}")
        chooser = validation_chooser(self)
        require(not (self.train_on_val and chooser),
                f"train_on_val = true trains on the validation photos, but {chooser} chooses on them; "
                "set select_epoch = \"last\", no early_stopping_patience and an lr_schedule other than plateau, "
                "or train_on_val = false")

    @property
    def resolved_backbone_lr(self) -> float:
        return self.backbone_lr if self.backbone_lr is not None else self.lr * self.backbone_lr_mult
