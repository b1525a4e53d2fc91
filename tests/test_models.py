"""Model families: shapes, initial scores, training that lowers the loss, optimizer groups, GMM fitting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iqa_ray.models.backbones import SUPPORTED_BACKBONES
from iqa_ray.models.base import IQAModel
from iqa_ray.models.gmm import GMMIQA, balance_term, posterior_entropy
from iqa_ray.models.hyperiqa import HyperIQA
from iqa_ray.models.losses import RankingLoss
from iqa_ray.models.mlp import MLPIQA
from iqa_ray.models.registry import FAMILIES, build_model, family_arguments

SIZE = 64
# Small heads keep the tests fast; dropout off so a few steps on one batch are deterministic.
SMALL = {
    "mlp": {"hidden_dim": 64, "dropout": 0.0},
    "gmm": {"n_clusters": 3, "feature_dim": 16, "hidden_dim": 32, "dropout": 0.0},
    "hyperiqa": {"hyper_channels": 32, "target_in": 96, "target_sizes": (48, 24, 12)},
}
LRS = {"mlp": (1e-3, 1e-4), "gmm": (3e-3, 1e-4), "hyperiqa": (1e-4, 1e-4)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small CPU models run no faster on two threads, and when the cores are shared with another
    # process, OpenMP threads spin-wait and run 10x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Noise images of increasing brightness, scored by brightness: learnable in a few steps.
    brightness = torch.linspace(0.2, 1.0, n)
    images = torch.rand(n, 3, SIZE, SIZE, generator=generator) * brightness.view(n, 1, 1, 1)
    return images, 20 + 60 * brightness


def _model(family: str, **overrides) -> IQAModel:
    torch.manual_seed(0)
    return build_model(family, backbone="resnet18", **{**SMALL[family], **overrides})


def _trainable(model: IQAModel) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


# --- registry ---------------------------------------------------------------------------------


def test_registry_names_and_errors():
    assert FAMILIES == {"mlp": MLPIQA, "gmm": GMMIQA, "hyperiqa": HyperIQA}
    with pytest.raises(ValueError, match="mlp, gmm, hyperiqa"):
        build_model("cnn", backbone="resnet18")
    with pytest.raises(ValueError, match="supported backbones: .*swin_base_patch4_window7_224"):
        build_model("mlp", backbone="resnet19")
    with pytest.raises(TypeError, match=r"\['hiden_dim', 'n_clusters'\]"):
        build_model("mlp", backbone="resnet18", hiden_dim=3, n_clusters=2)
    assert "refit_interval" in family_arguments("gmm")
    assert "loss" not in family_arguments("gmm")


# --- behaviour shared by every family -----------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_shape_and_initial_score_at_label_mean(family):
    model = _model(family)
    model.set_label_stats(62.0, 8.0)
    images, _ = _batch(6)
    if family == "gmm":
        model.on_train_start([images])
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert outputs["score"].shape == (6,)
    assert outputs["features"].shape[0] == 6
    # Heads start near 0 in standardised units, so scores start at the training mean.
    assert torch.all((outputs["score"] - 62.0).abs() < 0.1 * 8.0)
    assert {"label_mean", "label_std"} <= set(model.state_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(family):
    model = _model(family)
    images, targets = _batch(8)
    model.set_label_stats(float(targets.mean()), float(targets.std()))
    model.on_train_start([images])
    lr, backbone_lr = LRS[family]
    optimizer = torch.optim.Adam(model.param_groups(lr, backbone_lr))
    model.train()
    losses = []
    for _ in range(12):
        parts = model.compute_loss(model(images), targets)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_param_groups_are_lists_covering_each_trainable_parameter_once(family):
    model = _model(family)
    groups = model.param_groups(lr=1e-3, backbone_lr=1e-4)
    assert all(isinstance(g["params"], list) and g["params"] for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == _trainable(model)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == 1e-4
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert by_name["head"]["lr"] == 1e-3
    # The groups survive being consumed twice (the seed scripts' filter() bug would not).
    torch.optim.Adam(groups)
    assert sum(len(g["params"]) for g in groups) == len(ids)


def test_frozen_backbone_is_left_out_of_the_optimizer_and_stays_in_eval():
    model = build_model("mlp", backbone="resnet18", frozen_backbone=True, hidden_dim=16)
    groups = model.param_groups(1e-3, 1e-4)
    assert [g["name"] for g in groups] == ["head"]
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.head.training


def test_label_stats_validation():
    model = _model("mlp")
    with pytest.raises(ValueError, match="std"):
        model.set_label_stats(50.0, 0.0)
    with pytest.raises(ValueError, match="lr"):
        model.param_groups(lr=0.0, backbone_lr=1e-4)


def test_configured_regression_loss_is_used():
    model = _model("mlp", loss=RankingLoss(alpha=0.3, margin=0.5))
    images, targets = _batch(4)
    parts = model.compute_loss(model(images), targets)
    assert set(parts) == {"loss", "l1", "rank"}
    assert parts["loss"].item() == pytest.approx(0.7 * parts["l1"].item() + 0.3 * parts["rank"].item(), rel=1e-6)


# --- HyperIQA -----------------------------------------------------------------------------------


def test_hyperiqa_hypernetwork_group_gets_ten_times_the_lr():
    model = _model("hyperiqa", multiscale=True)
    by_name = {g["name"]: g for g in model.param_groups(lr=2e-5, backbone_lr=1e-5)}
    assert set(by_name) == {"backbone", "hypernet", "head"}
    assert by_name["hypernet"]["lr"] == pytest.approx(2e-4)
    hypernet = {id(p) for p in by_name["hypernet"]["params"]}
    assert {id(p) for p in model.weight_generators.parameters()} <= hypernet
    assert {id(p) for p in model.fusion.parameters()} <= hypernet
    assert not {id(p) for p in model.lda.parameters()} & hypernet


def test_hyperiqa_multiscale_fuses_every_stage_of_resnet18():
    model = _model("hyperiqa", multiscale=True).eval()
    assert model.fusion.in_channels == sum(model.backbone.channels) == 64 + 64 + 128 + 256 + 512
    assert model.fusion.out_channels == model.backbone.channels[-1]
    images, _ = _batch(3)
    with torch.no_grad():
        assert model(images)["score"].shape == (3,)


def test_hyperiqa_target_network_weights_are_per_image():
    model = _model("hyperiqa").eval()
    images, _ = _batch(4)
    with torch.no_grad():
        together = model(images)["score"]
        alone = torch.cat([model(images[i : i + 1])["score"] for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
    # Each image gets its own target-network weights.
    with torch.no_grad():
        hyper = model.hyper_reduce(model._semantic(model.backbone(images))).mean(dim=(2, 3))
        first_layer = model.weight_generators[0](hyper)
    assert first_layer.shape == (4, 48 * 96)
    assert torch.cdist(first_layer, first_layer)[~torch.eye(4, dtype=torch.bool)].min() > 1e-3


def test_hyperiqa_rejects_a_target_input_too_small_for_the_stages():
    with pytest.raises(ValueError, match="target_in=32"):
        _model("hyperiqa", target_in=32, lda_dim=16)


def test_hyperiqa_multiscale_on_swin_tiny():
    torch.manual_seed(0)
    model = build_model(
        "hyperiqa", backbone="swin_tiny_patch4_window7_224", img_size=SIZE, multiscale=True, **SMALL["hyperiqa"]
    )
    assert model.fusion.in_channels == 96 + 192 + 384 + 768
    images, targets = _batch(2)
    outputs = model(images)
    assert outputs["score"].shape == (2,)
    model.compute_loss(outputs, targets)["loss"].backward()
    assert model.fusion.weight.grad is not None and torch.isfinite(model.fusion.weight.grad).all()


# --- GMM ----------------------------------------------------------------------------------------


def _two_groups(n: int = 8) -> torch.Tensor:
    """Dark and bright noise images, interleaved (dark, bright, dark, ...) like a shuffled loader."""
    generator = torch.Generator().manual_seed(1)
    dark = 0.15 * torch.rand(n // 2, 3, SIZE, SIZE, generator=generator)
    bright = 0.85 + 0.15 * torch.rand(n // 2, 3, SIZE, SIZE, generator=generator)
    return torch.stack([dark, bright], dim=1).flatten(0, 1)


def test_gmm_mixture_is_fitted_from_training_features():
    model = _model("gmm", n_clusters=2)
    assert not bool(model.mixture_fitted) and torch.all(model.means == 0)
    images = _two_groups(8)
    batches = [images[:4], images[4:]]
    running_mean = model.backbone.body.bn1.running_mean.clone()
    model.on_train_start(batches)
    assert bool(model.mixture_fitted) and model.num_fits == 1
    assert not torch.all(model.means == 0)
    assert torch.equal(model.backbone.body.bn1.running_mean, running_mean)  # fitting left BN alone

    # The fit used the features the gate sees in training (train mode, same batches).
    with torch.no_grad():
        features = torch.cat([model.project(batch) for batch in batches])
        posteriors = model.log_posteriors(features).exp()
    # Dark and bright images land in different clusters.
    clusters = posteriors.argmax(1)
    assert clusters[0::2].unique().numel() == 1 and clusters[1::2].unique().numel() == 1
    assert clusters[0] != clusters[1]
    # A converged EM fit is an M-step fixed point: each mean is its cluster's weighted feature mean.
    weighted = (posteriors.T @ features) / posteriors.sum(0, keepdim=True).T
    torch.testing.assert_close(model.means.detach(), weighted, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(model.mix_logits.softmax(0).detach(), posteriors.mean(0), rtol=1e-3, atol=1e-3)


class _CountingBatches:
    """An iterable of image batches that records how often it was read."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.reads = images, 0

    def __iter__(self):
        self.reads += 1
        yield self.images


def test_gmm_refit_honours_refit_interval():
    model = _model("gmm", n_clusters=2, refit_interval=2)
    batches = _CountingBatches(_two_groups(8))
    model.on_train_start(batches)
    refit_epochs = []
    for epoch in range(6):
        before = model.num_fits
        model.on_epoch_start(epoch, batches)
        if model.num_fits > before:
            refit_epochs.append(epoch)
    assert refit_epochs == [2, 4]
    assert batches.reads == 3  # the loader is not even read on other epochs

    never = _model("gmm", n_clusters=2, refit_interval=0)
    never.on_train_start([_two_groups(8)])
    for epoch in range(5):
        never.on_epoch_start(epoch, [_two_groups(8)])
    assert never.num_fits == 1


def test_gmm_on_train_start_keeps_a_fit_loaded_from_a_checkpoint():
    fitted = _model("gmm", n_clusters=2)
    fitted.on_train_start([_two_groups(8)])
    resumed = _model("gmm", n_clusters=2)
    resumed.load_state_dict(fitted.state_dict())
    resumed.on_train_start([torch.rand(8, 3, SIZE, SIZE)])
    assert resumed.num_fits == 0
    assert torch.equal(resumed.means, fitted.means)


def _three_groups(per_group: int = 4) -> torch.Tensor:
    """Dark, mid-grey and bright noise images, interleaved: three clusters, so 6 possible orders."""
    generator = torch.Generator().manual_seed(2)
    groups = [low + 0.15 * torch.rand(per_group, 3, SIZE, SIZE, generator=generator) for low in (0.0, 0.45, 0.85)]
    return torch.stack(groups, dim=1).flatten(0, 1)


def _gate_and_scores(model: GMMIQA, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard clusters and scores of images, in train mode like the features the mixture is fitted on."""
    model.train()
    with torch.no_grad():
        outputs = model(images)
    return GMMIQA.cluster_assignments(outputs), outputs["score"]


def _fitted_three_cluster_model() -> tuple[GMMIQA, torch.Tensor]:
    model = _model("gmm", n_clusters=3, refit_interval=1, random_state=0)
    model.set_label_stats(50.0, 10.0)
    images = _three_groups()
    model.on_train_start([images])
    # Distinct expert offsets (-1, 0, +1 standard deviations): a cluster handed to another expert
    # then moves the score by 10 points instead of by the near-zero spread of fresh experts.
    with torch.no_grad():
        model.expert_b2.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    return model, images


def test_gmm_refit_on_the_same_features_keeps_clusters_and_scores():
    model, images = _fitted_three_cluster_model()
    clusters, scores = _gate_and_scores(model, images)
    assert clusters.unique().numel() == 3  # three real clusters, so a permutation would show
    # Another seed: a cold k-means start with it finds the same clusters in a rotated order.
    model.random_state = 2
    model.on_epoch_start(epoch=1, feature_batches=[images])
    assert model.num_fits == 2
    refit_clusters, refit_scores = _gate_and_scores(model, images)
    assert torch.equal(refit_clusters, clusters)
    torch.testing.assert_close(refit_scores, scores, rtol=1e-3, atol=0.0)


def test_gmm_refit_after_training_keeps_each_components_identity():
    model, images = _fitted_three_cluster_model()
    old_means = model.means.detach().clone()
    _, targets = _batch(images.shape[0])
    # A few small steps: they move the backbone and projection, hence the features the refit sees,
    # by about a tenth of the distance between clusters. (The means themselves barely get a
    # gradient: the gate's posteriors are saturated on such well-separated clusters.)
    optimizer = torch.optim.Adam(model.param_groups(lr=1e-4, backbone_lr=1e-6))
    for _ in range(3):
        parts = model.compute_loss(model(images), targets)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
    model.random_state = 2  # a cold k-means start with this seed returns the clusters in a rotated order
    model.on_epoch_start(epoch=1, feature_batches=[images])
    assert model.num_fits == 2
    moved = (model.means.detach() - old_means).norm(dim=1)
    assert torch.all(moved > 0.05), moved  # the refit did follow the moved features
    # Each refitted component is nearest to the old component of the same index.
    nearest_old = torch.cdist(model.means.detach(), old_means).argmin(dim=1)
    assert nearest_old.tolist() == [0, 1, 2]
    assert _gate_and_scores(model, images)[0].unique().numel() == 3  # the refit kept three clusters


def test_gmm_component_matching_undoes_a_permutation_and_breaks_ties_by_distance():
    old_means = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    variances = np.ones((4, 2))
    # Old components 2 and 3 claim no sample, so overlap alone cannot tell them apart: their means do.
    old_posteriors = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 1.0, 0, 0]])
    permutation = np.array([3, 2, 0, 1])  # new component j is old component permutation[j], moved a little
    order = GMMIQA._match_components(
        old_posteriors=old_posteriors,
        new_posteriors=old_posteriors[:, permutation],
        old_means=old_means,
        old_vars=variances,
        new_means=old_means[permutation] + 0.1,
        new_vars=variances,
    )
    # order[k] is the new component that takes old component k's place.
    assert permutation[order].tolist() == [0, 1, 2, 3]


def test_gmm_random_state_follows_the_run_seed():
    from iqa_ray.training.build import build
    from iqa_ray.training.config import TrainConfig

    seen = {}
    for seed in (3, 11):
        config = TrainConfig.from_dict(
            {"family": "gmm", "backbone": "resnet18", "pretrained": "none", "crop_size": SIZE, "seed": seed,
             **SMALL["gmm"]}
        )
        model = build(config, torch.device("cpu"))
        assert isinstance(model, GMMIQA)
        seen[seed] = model.random_state
    assert seen == {3: 3, 11: 11}
    # Families without an EM fit are not handed a random_state they would reject.
    assert "random_state" not in TrainConfig.from_dict({"family": "mlp", "seed": 3}).model.family_kwargs(seed=3)


def test_gmm_balance_and_cluster_terms():
    uniform = torch.full((6, 4), 0.25)
    collapsed = torch.zeros(6, 4)
    collapsed[:, 0] = 1.0
    assert balance_term(uniform).abs().item() < 1e-6
    assert balance_term(collapsed).item() == pytest.approx(math.log(4), rel=1e-6)
    # Confident but evenly spread assignments are balanced too.
    spread = torch.eye(4).repeat(2, 1)
    assert balance_term(spread).abs().item() < 1e-6
    assert posterior_entropy(uniform.log()).item() == pytest.approx(math.log(4), rel=1e-6)
    log_collapsed = torch.log_softmax(collapsed * 50, dim=1)
    assert posterior_entropy(log_collapsed).item() < 1e-6


def test_gmm_loss_reports_each_part_and_sums_them():
    model = _model("gmm", cluster_loss_weight=0.5, balance_weight=2.0)
    images, targets = _batch(6)
    model.on_train_start([images])
    outputs = model(images)
    assert outputs["posteriors"].shape == (6, 3)
    torch.testing.assert_close(outputs["posteriors"].sum(1), torch.ones(6))
    assignments = GMMIQA.cluster_assignments(outputs)
    assert assignments.shape == (6,) and int(assignments.max()) < 3
    parts = model.compute_loss(outputs, targets)
    assert set(parts) == {"loss", "regression", "l1", "cluster", "balance"}
    expected = parts["regression"] + 0.5 * parts["cluster"] + 2.0 * parts["balance"]
    torch.testing.assert_close(parts["loss"], expected)


def test_gmm_argument_validation():
    with pytest.raises(ValueError, match="n_clusters must be an integer >= 1"):
        _model("gmm", n_clusters=0)
    with pytest.raises(ValueError, match="refit_interval"):
        _model("gmm", refit_interval=-1)
    model = _model("gmm", n_clusters=3)
    with pytest.raises(ValueError, match="3 clusters to 2 samples"):
        model.on_train_start([torch.rand(2, 3, SIZE, SIZE)])


# --- every family on every backbone (slow) ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.in_process
@pytest.mark.parametrize("backbone", SUPPORTED_BACKBONES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_on_every_backbone(family, backbone):
    torch.manual_seed(0)
    size = 32 if backbone == "swin_base_patch4_window7_224" else SIZE
    model = build_model(family, backbone=backbone, img_size=size, **SMALL[family])
    images = torch.rand(4, 3, size, size)
    targets = torch.tensor([20.0, 40.0, 60.0, 80.0])
    model.on_train_start([images])
    outputs = model(images)
    assert outputs["score"].shape == (4,)
    model.compute_loss(outputs, targets)["loss"].backward()
    head_grads = [p.grad for g in model.param_groups(1e-3, 1e-4) if g["name"] != "backbone" for p in g["params"]]
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
