"""GMMIQA: the CNN + GMM + MLP cluster model of the seed experiments (seeds 000 and 001).

No single paper: a mixture of experts (Jacobs, Jordan, Nowlan, Hinton, "Adaptive Mixtures of
Local Experts", Neural Computation 1991) whose gate is a diagonal Gaussian mixture over projected
backbone features, so that images with similar content/distortion statistics share a quality
regressor. The mixture starts from an EM fit (scikit-learn's ``GaussianMixture``) on training
features and is then trained end to end, regularised as in regularised information maximisation
(Krause, Perona, Gomes, "Discriminative Clustering by Regularized Information Maximization",
NeurIPS 2010):

* **cluster loss** = mean entropy of the posteriors (confident assignments). The negative
  log-likelihood of the features was rejected: with a learnable projection it is unbounded below,
  because the projection can shrink all features onto one component whose variance then
  collapses; entropy is bounded by 0 and log K.
* **balance loss** = KL(mean posterior || uniform) = log K - H(mean posterior): 0 when the batch
  uses every cluster equally, log K when it collapses onto one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from iqa_ray.core.options import Options, finite, positive_int, require
from iqa_ray.models.backbones import Backbone
from iqa_ray.models.base import IQAModel, full_precision
from iqa_ray.models.losses import RegressionLoss

__all__ = ["GMMIQA", "GMMOptions", "balance_term", "posterior_entropy", "images_of"]


@dataclass(frozen=True)
class GMMOptions(Options):
    """The ``gmm`` family's config keys (see :class:`GMMIQA`).

    Attributes:
        n_clusters: mixture components (experts).
        feature_dim: width of the projected features the mixture models.
        hidden_dim, dropout: each expert's MLP.
        cluster_loss_weight: weight of the posterior-entropy loss, >= 0.
        balance_weight: weight of the cluster-balance loss, >= 0.
        refit_interval: refit the mixture by EM every this many epochs; 0 never refits.
    """

    n_clusters: int = 8
    feature_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.3
    cluster_loss_weight: float = 0.1
    balance_weight: float = 1.0
    refit_interval: int = 0

    def __post_init__(self) -> None:
        require(positive_int(self.n_clusters), f"n_clusters must be an integer >= 1, got {self.n_clusters!r}")
        for name in ("feature_dim", "hidden_dim"):
            value = getattr(self, name)
            require(positive_int(value), f"{name} must be >= 1, got {value!r}")
        require(finite(self.dropout) and 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("cluster_loss_weight", "balance_weight"):
            value = getattr(self, name)
            require(finite(value) and value >= 0, f"{name} must be >= 0, got {value!r}")
        require(isinstance(self.refit_interval, int) and not isinstance(self.refit_interval, bool)
                and self.refit_interval >= 0,
                f"refit_interval must be an integer >= 0 (0 = never refit), got {self.refit_interval!r}")

# Keeps exp(log_var) inside float32's comfortable range whatever the optimiser does.
_LOG_VAR_RANGE = (-12.0, 12.0)


def images_of(batch: Any) -> Tensor:
    """The image tensor of a batch given as a tensor or as ``(images, ...)``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"expected a batch of images (Tensor) or (images, ...), got {type(batch).__name__}")


def posterior_entropy(log_posteriors: Tensor) -> Tensor:
    """Mean over the batch of the entropy of each sample's cluster posterior (nats).

    Takes log posteriors: posteriors that underflow to exactly 0 would make the gradient of
    ``p log p`` infinite, while ``exp(log_p) * log_p`` stays finite.
    """
    return -(log_posteriors.exp() * log_posteriors).sum(dim=1).mean()


def balance_term(posteriors: Tensor) -> Tensor:
    """KL divergence of the batch's mean posterior from the uniform distribution (nats)."""
    usage = posteriors.mean(dim=0)
    # The clamp keeps the gradient finite for a cluster no sample uses (log 0 = -inf).
    return (usage * usage.clamp_min(1e-12).log()).sum() + math.log(posteriors.shape[1])


class GMMIQA(IQAModel):
    """Backbone -> pooled features -> projection -> diagonal GMM gate -> per-cluster MLP experts.

    Args:
        backbone: Feature extractor.
        n_clusters: Number of Gaussian components and expert heads, >= 1.
        feature_dim: Dimension of the projected features the mixture lives in.
        hidden_dim: Hidden width of each expert MLP.
        dropout: Dropout on the experts' hidden layer, in [0, 1).
        cluster_loss_weight: Weight of the posterior-entropy term.
        balance_weight: Weight of the cluster-usage balance term.
        refit_interval: Refit the mixture by EM every this many epochs; 0 never refits.
        random_state: Seed of the first EM fit's k-means initialisation, for reproducibility; the
            engine passes the run's seed.
        loss: Regression loss; L1 by default.

    Outputs of ``forward``: ``"score"`` (B,), ``"features"`` (B, feature_dim) projected features,
    ``"posteriors"`` (B, n_clusters) cluster responsibilities and their logs ``"log_posteriors"``,
    ``"cluster_scores"`` (B, n_clusters)
    each expert's score on the label scale.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        n_clusters: int = GMMOptions.n_clusters,
        feature_dim: int = GMMOptions.feature_dim,
        hidden_dim: int = GMMOptions.hidden_dim,
        dropout: float = GMMOptions.dropout,
        cluster_loss_weight: float = GMMOptions.cluster_loss_weight,
        balance_weight: float = GMMOptions.balance_weight,
        refit_interval: int = GMMOptions.refit_interval,
        random_state: int = 0,
        loss: RegressionLoss | None = None,
    ) -> None:
        super().__init__(backbone, loss=loss)
        GMMOptions(n_clusters=n_clusters, feature_dim=feature_dim, hidden_dim=hidden_dim, dropout=dropout,
                   cluster_loss_weight=cluster_loss_weight, balance_weight=balance_weight,
                   refit_interval=refit_interval)  # validates (ConfigError names the key)
        self.n_clusters = n_clusters
        self.feature_dim = feature_dim
        self.cluster_loss_weight = float(cluster_loss_weight)
        self.balance_weight = float(balance_weight)
        self.refit_interval = refit_interval
        self.random_state = random_state
        self.num_fits = 0  # EM fits done by this process; the checkpointed flag is mixture_fitted

        self.projection = nn.Linear(backbone.channels[-1], feature_dim)
        # Until the first EM fit every component is identical, so posteriors are uniform and the
        # model is a plain average of the experts.
        self.means = nn.Parameter(torch.zeros(n_clusters, feature_dim))
        self.log_vars = nn.Parameter(torch.zeros(n_clusters, feature_dim))
        self.mix_logits = nn.Parameter(torch.zeros(n_clusters))
        self.register_buffer("mixture_fitted", torch.tensor(False))

        # The experts as batched weights: one einsum scores all clusters, no loop over heads.
        bound = 1.0 / math.sqrt(feature_dim)  # nn.Linear's default initialisation range
        self.expert_w1 = nn.Parameter(torch.empty(n_clusters, feature_dim, hidden_dim).uniform_(-bound, bound))
        self.expert_b1 = nn.Parameter(torch.empty(n_clusters, hidden_dim).uniform_(-bound, bound))
        self.expert_w2 = nn.Parameter(torch.randn(n_clusters, hidden_dim) * 1e-3)
        self.expert_b2 = nn.Parameter(torch.zeros(n_clusters))
        self.expert_dropout = nn.Dropout(dropout)

    def project(self, images: Tensor) -> Tensor:
        """Projected features of images, the space the mixture lives in: (B, feature_dim), float32."""
        stages = self.backbone(images)
        with full_precision(images.device):
            return self._project(stages[-1].float())

    def _project(self, last_stage: Tensor) -> Tensor:
        return self.projection(last_stage.mean(dim=(2, 3)))

    def log_posteriors(self, features: Tensor) -> Tensor:
        """Log cluster responsibilities of projected features under the current mixture: (B, K)."""
        log_vars = self.log_vars.clamp(*_LOG_VAR_RANGE)
        squared = ((features.unsqueeze(1) - self.means.unsqueeze(0)) ** 2 / log_vars.exp().unsqueeze(0)).sum(-1)
        log_density = -0.5 * (squared + log_vars.sum(-1) + self.feature_dim * math.log(2 * math.pi))
        log_joint = F.log_softmax(self.mix_logits, dim=0) + log_density
        return log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)

    def forward_head(self, stages: list[Tensor]) -> dict[str, Tensor]:
        features = self._project(stages[-1])
        log_posteriors = self.log_posteriors(features)
        posteriors = log_posteriors.exp()
        hidden = F.gelu(torch.einsum("bd,kdh->bkh", features, self.expert_w1) + self.expert_b1)
        expert_out = torch.einsum("bkh,kh->bk", self.expert_dropout(hidden), self.expert_w2) + self.expert_b2
        standardised = (posteriors * expert_out).sum(dim=1)
        return {
            "score": self.to_label_scale(standardised),
            "features": features,
            "posteriors": posteriors,
            "log_posteriors": log_posteriors,
            "cluster_scores": self.to_label_scale(expert_out),
        }

    def compute_loss(self, outputs: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Regression loss + ``cluster_loss_weight`` x entropy + ``balance_weight`` x balance.

        Returns:
            ``"loss"``, ``"regression"`` (the regression loss's total), its own parts (``"l1"``,
            ``"rank"``, ...), ``"cluster"`` (posterior entropy) and ``"balance"`` (KL from uniform).
        """
        regression = self.loss_fn(outputs["score"], target)
        cluster = posterior_entropy(outputs["log_posteriors"])
        balance = balance_term(outputs["posteriors"])
        total = regression["loss"] + self.cluster_loss_weight * cluster + self.balance_weight * balance
        parts = {k: v for k, v in regression.items() if k != "loss"}
        return {"loss": total, "regression": regression["loss"], **parts, "cluster": cluster, "balance": balance}

    @staticmethod
    def cluster_assignments(outputs: dict[str, Tensor]) -> Tensor:
        """Hard cluster index of each sample (argmax posterior), for cluster-distribution plots."""
        return outputs["posteriors"].argmax(dim=1)

    @torch.no_grad()
    def fit_mixture(self, feature_batches: Iterable[Tensor]) -> None:
        """Fit the mixture by EM on the projected features of the given image batches.

        Features are computed in the mode the model is in (train mode when the engine calls the
        hooks), with BatchNorm running statistics left as they were.

        The first fit starts EM from a k-means initialisation seeded by ``random_state``. A refit
        (``mixture_fitted`` already True) starts EM from the current mixture and then matches the
        new components to the old ones (see :meth:`_match_components`), so that component k
        still gates expert k, the expert trained on that cluster.

        Args:
            feature_batches: Batches of training images (float, [0, 1], (B, 3, H, W)) or
                ``(images, ...)`` tuples; moved to the model's device.
        """
        # Features are taken in the mode the model is in. The engine calls the hooks in train mode,
        # so the mixture fits the features the gate sees while training: with a freshly
        # initialised backbone, batch statistics and BatchNorm running statistics differ so much
        # that a fit on eval-mode features sends every training batch into one cluster. Fitting
        # must not change the model, so the running statistics are restored afterwards.
        saved = {name: buffer.clone() for name, buffer in self.backbone.named_buffers()}
        try:
            device = self.means.device
            chunks = [self.project(images_of(batch).to(device)).double().cpu() for batch in feature_batches]
        finally:
            for name, buffer in self.backbone.named_buffers():
                buffer.copy_(saved[name])
        if not chunks:
            raise ValueError("cannot fit the mixture: feature_batches yielded no batches")
        features = torch.cat(chunks).numpy()
        if features.shape[0] < self.n_clusters:
            raise ValueError(
                f"cannot fit {self.n_clusters} clusters to {features.shape[0]} samples; give at least "
                "n_clusters training images"
            )
        refit = bool(self.mixture_fitted)
        if refit:
            # The mixture the gate uses now, in float64 like the features; the clamp is the one
            # log_posteriors applies, so EM starts from exactly the gate the experts were trained with.
            old_means = self.means.detach().double().cpu().numpy()
            old_vars = self.log_vars.detach().clamp(*_LOG_VAR_RANGE).double().exp().cpu().numpy()
            old_weights = torch.softmax(self.mix_logits.detach().double(), dim=0).cpu().numpy()
            old_posteriors = self.log_posteriors(torch.as_tensor(features, dtype=self.means.dtype, device=device))
            old_posteriors = old_posteriors.exp().double().cpu().numpy()
            # Warm start: EM then mostly refines the current components instead of re-deriving
            # them from a k-means run whose cluster order is arbitrary.
            init = {"means_init": old_means, "weights_init": old_weights, "precisions_init": 1.0 / old_vars}
        else:
            init = {}
        # Regularise covariances relative to the features' own scale: a fixed reg_covar is either
        # negligible or dominant depending on how large the projected features happen to be.
        reg_covar = 1e-3 * float(np.mean(features.var(axis=0))) + 1e-8
        from sklearn.mixture import GaussianMixture  # here, not at the top: every trial's process imports this module

        mixture = GaussianMixture(
            n_components=self.n_clusters,
            covariance_type="diag",
            reg_covar=reg_covar,
            max_iter=200,
            random_state=self.random_state,
            **init,
        ).fit(features)
        means, variances, weights = mixture.means_, mixture.covariances_, mixture.weights_
        if refit:
            # EM can still wander from its warm start (components swap or merge-and-split), so
            # identity is enforced rather than assumed: new component order[k] becomes component k.
            order = self._match_components(
                old_posteriors=old_posteriors,
                new_posteriors=mixture.predict_proba(features),
                old_means=old_means,
                old_vars=old_vars,
                new_means=means,
                new_vars=variances,
            )
            means, variances, weights = means[order], variances[order], weights[order]
        dtype = self.means.dtype
        # In place, so that optimisers keep pointing at the same tensors.
        self.means.copy_(torch.as_tensor(means, dtype=dtype, device=device))
        self.log_vars.copy_(torch.as_tensor(np.log(variances), dtype=dtype, device=device))
        self.mix_logits.copy_(torch.as_tensor(np.log(weights), dtype=dtype, device=device))
        self.mixture_fitted.fill_(True)
        self.num_fits += 1

    @staticmethod
    def _match_components(
        *,
        old_posteriors: np.ndarray,
        new_posteriors: np.ndarray,
        old_means: np.ndarray,
        old_vars: np.ndarray,
        new_means: np.ndarray,
        new_vars: np.ndarray,
    ) -> np.ndarray:
        """The new component to put in each old component's place: ``order[k]`` replaces k.

        Components are matched one to one (Hungarian algorithm) to maximise the overlap of old and
        new responsibilities on the same features: the share of samples that old component k and
        new component j both claim. That is the quantity that matters here, because expert k was
        trained on the samples old component k claimed. Components that claim (almost) no samples
        overlap with nothing, so the distance between means, scaled by the components' average
        variance, breaks such ties; it is scaled into [0, 1e-6], so it only decides between
        matchings whose total overlaps differ by less than K x 1e-6.

        Args:
            old_posteriors, new_posteriors: (N, K) responsibilities of the old and new mixture.
            old_means, new_means: (K, D) component means.
            old_vars, new_vars: (K, D) diagonal variances.

        Returns:
            (K,) permutation of the new components.
        """
        overlap = old_posteriors.T @ new_posteriors / old_posteriors.shape[0]  # (K old, K new), sums to 1
        gaps = old_means[:, None, :] - new_means[None, :, :]
        distance = (gaps**2 / (0.5 * (old_vars[:, None, :] + new_vars[None, :, :]))).sum(-1)
        # 1e-6: a tie-break weight; overlap differences of a millionth of the samples are noise.
        cost = -overlap + 1e-6 * distance / (distance.max() + 1e-12)
        old_index, new_index = linear_sum_assignment(cost)
        return new_index[np.argsort(old_index)]

    def on_train_start(self, feature_batches: Iterable[Tensor]) -> None:
        """Fit the mixture on training features, unless a loaded checkpoint already holds a fit."""
        if not bool(self.mixture_fitted):
            self.fit_mixture(feature_batches)

    def on_epoch_start(self, epoch: int, feature_batches: Iterable[Tensor]) -> None:
        """Refit the mixture at epochs ``refit_interval``, ``2 * refit_interval``, ... (0-based).

        Adam's moment estimates for the mixture parameters still describe the old fit afterwards;
        they wash out within a few hundred steps.
        """
        if self.refit_interval > 0 and epoch > 0 and epoch % self.refit_interval == 0:
            self.fit_mixture(feature_batches)

    def extra_repr(self) -> str:
        return (
            f"n_clusters={self.n_clusters}, feature_dim={self.feature_dim}, "
            f"cluster_loss_weight={self.cluster_loss_weight}, balance_weight={self.balance_weight}, "
            f"refit_interval={self.refit_interval}, {super().extra_repr()}"
        )
