"""GMM: the log-density of a Gaussian mixture fitted without labels to the training features (OpenOOD's ``gmm``
postprocessor, the semantic score of SEM: Yang et al., "Full-Spectrum Out-of-Distribution Detection", IJCV 2023).

OpenOOD (``openood/postprocessors/gmm_postprocessor.py``, ``get_GMM_stat`` lines 59-118, ``compute_GMM_score`` lines
121-168) projects a layer's training features on their top principal axes (``reduce_feature_dim``, sklearn's PCA,
without centring the projected features), fits sklearn's ``GaussianMixture(n_components, covariance_type="tied",
random_state=0)`` by EM from a k-means initialisation, and scores ``log(sum_k w_k exp(-(z - mu_k)^T P (z - mu_k) / 2)
+ 1e-45)``, P the tied precision (no log-determinant or 2 pi: constants). ``configs/postprocessors/gmm.yml``: 50
components on a 50-d PCA projection; its weights ``alpha_list: [0, 0, 1]`` keep one layer's term alone.

Here:

- the features are the penultimate ones. OpenOOD's ``gmm.yml`` takes ``feature_list[2]``, which on its CIFAR
  ResNet-18 is layer2's flattened 128 x 16 x 16 map (32,768-d: its PCA needs every training map at once), and on the
  LeNet the config was written for is the flattened last convolution; its CIFAR sweep
  (``configs/postprocessors/_gmm_iter/cifar_gmm_*.yml``) gives the weight 1 to the penultimate features (10
  components, PCA to 50 or 10) and -1e-4 to a stem statistic, which we leave out;
- the principal axes are the eigenvectors of the exact covariance of all training features (the statistics), the EM
  runs on the ``bank`` of training features (all of them on CIFAR, as OpenOOD; a stride of them on ImageNet): the
  axes need every feature before any can be projected, so the one statistics pass cannot fit the mixture itself;
- EM is sklearn's (tied covariance, ``reg_covar`` 1e-6, ``tol`` 1e-3, 100 iterations; weights, means and
  covariance from the responsibilities exactly as ``_estimate_gaussian_parameters``), written in torch (sklearn is
  not a dependency of this package), from sklearn's k-means (k-means++ with 2 + ln K local trials, Lloyd to label
  convergence or its centre-shift tolerance 1e-4 x mean variance, 300 iterations), seeded by ``seed`` (our generator,
  so not sklearn's random draws: the same algorithm, another random start);
- the score is ``logsumexp_k(log w_k - d_k / 2)``, the log of OpenOOD's sum computed without underflow. OpenOOD's
  float32 ``exp`` is 0 for every component once ``d_k > ~207``, so all such images tie at ``log(1e-45)``; here they
  keep their order. Where OpenOOD's sum is above 1e-38 the two agree; the 1e-45 floor changes no order.

pytorch-ood 0.4's ``GMM`` is another method: one Gaussian per class with its own covariance, fitted from the labels
(no EM, no projection), its negative log-likelihood with the constants.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_ood.errors import FitError
from lightning_ood.linalg import spectrum
from lightning_ood.scoring.base import Scorer, check_count, check_nonnegative, check_seed
from lightning_ood.statistics import Bank, FeatureStatistics

EPS = torch.finfo(torch.float64).eps  # numpy's float64 eps: sklearn adds 10 eps to every component's weight


# ------------------------------------------------------------------------------------------------ k-means (sklearn's)
def squared_distances(x: Tensor, centres: Tensor) -> Tensor:  # (N, D), (K, D) -> (N, K)
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)).clamp_min(0)


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:  # (N, D) -> (K,) indices
    """Greedy k-means++ (sklearn's ``_kmeans_plusplus``): each new centre is the best of ``2 + ln K`` candidates drawn
    with probability proportional to the squared distance to the closest centre so far."""
    n = len(x)
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = squared_distances(x, x[chosen[0]][None])[:, 0]  # (N,)
    for _ in range(1, k):
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * closest.sum()
        candidates = torch.searchsorted(closest.cumsum(0), draws).clamp_max(n - 1)  # (trials,)
        with_candidate = torch.minimum(closest[None, :], squared_distances(x[candidates], x))  # (trials, N)
        best = int(with_candidate.sum(1).argmin())
        closest = with_candidate[best]
        chosen.append(int(candidates[best]))
    return torch.tensor(chosen, device=x.device)


def cluster_means(x: Tensor, labels: Tensor, centres: Tensor) -> Tensor:
    """Each cluster's mean; an empty cluster takes the point farthest from its own centre (sklearn relocates empty
    clusters to the farthest points, which leave their clusters)."""
    k = len(centres)
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten()
    if len(empty):
        labels = labels.clone()
        far = ((x - centres[labels]) ** 2).sum(1).topk(len(empty)).indices
        labels[far] = empty
        counts = torch.bincount(labels, minlength=k)
    sums = torch.zeros_like(centres).index_add_(0, labels, x)
    return sums / counts[:, None].to(x.dtype)


def kmeans_labels(x: Tensor, k: int, seed: int = 0, max_iter: int = 300, tol: float = 1e-4) -> Tensor:
    """sklearn's ``KMeans(k, n_init=1)`` (Lloyd) labels of ``x`` (N, D), float64, from a seeded k-means++."""
    generator = torch.Generator().manual_seed(seed)
    x = x - x.mean(0)  # as sklearn: the same clusters, better conditioned distances
    centres = x[kmeans_plusplus(x, k, generator)]
    threshold = tol * x.var(0, unbiased=False).mean()
    labels = squared_distances(x, centres).argmin(1)
    for _ in range(max_iter):
        new_centres = cluster_means(x, labels, centres)
        shift = ((new_centres - centres) ** 2).sum()
        centres = new_centres
        new_labels = squared_distances(x, centres).argmin(1)
        if torch.equal(new_labels, labels) or shift <= threshold:
            return new_labels
        labels = new_labels
    return labels


# ------------------------------------------------------------------------------------------------ EM (sklearn's, tied)
def tied_parameters(x: Tensor, resp: Tensor, reg: float) -> tuple[Tensor, Tensor, Tensor]:
    """sklearn's ``_estimate_gaussian_parameters(..., "tied")``: ``(nk, means, covariance)`` from responsibilities."""
    nk = resp.sum(0) + 10 * EPS  # (K,)
    means = resp.T @ x / nk[:, None]  # (K, D)
    covariance = (x.T @ x - (nk[:, None] * means).T @ means) / nk.sum()
    return nk, means, covariance + reg * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)


def precision_cholesky(covariance: Tensor) -> Tensor:  # (D, D) -> U with U U^T = covariance^-1 (sklearn's layout)
    lower, info = torch.linalg.cholesky_ex(covariance)
    if int(info):  # sklearn's message for the same failure
        raise FitError(
            "a component's covariance is not positive definite (some components collapsed onto too few features): "
            "lower components, or raise reg"
        )
    eye = torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).T


def fit_tied_gmm(
    x: Tensor, labels: Tensor, k: int, reg: float = 1e-6, tol: float = 1e-3, max_iter: int = 100
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights (K,), means (K, D), precision Cholesky factor U (D, D))`` of sklearn's tied ``GaussianMixture``
    fitted by EM on ``x`` (N, D) float64 from the one-hot responsibilities of ``labels``."""
    n, d = x.shape
    nk, means, covariance = tied_parameters(x, nn.functional.one_hot(labels, k).to(x.dtype), reg)
    weights = nk / n
    chol = precision_cholesky(covariance)
    lower_bound = -math.inf
    for _ in range(max_iter):
        previous = lower_bound
        # E-step: log w_k + log N(x | mu_k, Sigma), normalised over k
        y = x @ chol  # (N, D)
        log_prob = -0.5 * (d * math.log(2 * math.pi) + squared_distances(y, means @ chol)) + chol.diagonal().log().sum()
        weighted = log_prob + weights.log()
        norm = torch.logsumexp(weighted, dim=1)
        # M-step
        nk, means, covariance = tied_parameters(x, (weighted - norm[:, None]).exp(), reg)
        weights = nk / nk.sum()
        chol = precision_cholesky(covariance)
        lower_bound = float(norm.mean())
        if abs(lower_bound - previous) < tol:
            break
    return weights, means, chol


def principal_axes(stats: FeatureStatistics, dim: int | None) -> Tensor:  # -> (L, dim) float64
    """The top-``dim`` eigenvectors of the training features' covariance (sklearn PCA's ``components_.T`` up to
    signs, which change no Gaussian mixture); ``None``, or a ``dim`` of at least the feature size: no projection
    (OpenOOD's ``none``: the identity; a 50-axis PCA of 32-d features keeps them all)."""
    covariance = stats.total_covariance.double()
    if dim is None or dim >= len(covariance):
        return torch.eye(len(covariance), dtype=torch.float64, device=covariance.device)
    found = spectrum(covariance)
    if found.rank < dim:
        raise FitError(
            f"its {dim} principal axes are not determined: the features of its {stats.num_samples} training images "
            f"span {found.rank} (the rest is rounding noise); it needs a dim of at most {found.rank} (or none: no "
            f"projection), or more training images"
        )
    return found.vectors[:, :dim]


class GMM(Scorer):
    """``score = logsumexp_k(log w_k - (z - mu_k)^T P (z - mu_k) / 2)`` with ``z`` the penultimate feature projected
    on the top ``dim`` principal axes and a ``components``-Gaussian tied mixture fitted by EM on the training bank.

    Args:
        components: mixture components (50, OpenOOD ``configs/postprocessors/gmm.yml`` line 11); at most one per
            feature of the bank (more is refused, as sklearn does).
        dim: principal axes kept (50, ``pca_50``, line 14); ``None`` or at least the feature size: no projection.
        seed: seeds the k-means++ initialisation (OpenOOD: sklearn's ``random_state=0``).
        reg: added to the covariance's diagonal (sklearn's ``reg_covar``).
    """

    needs_statistics = frozenset({Bank})
    # the settings OpenOOD tried: gmm.yml (50 components, pca_50) and _gmm_iter/cifar_gmm_*.yml (10, pca_10 / pca_50)
    search_space: ClassVar[dict[str, tuple]] = {"components": (10, 50), "dim": (10, 50)}

    def __init__(self, components: int = 50, dim: int | None = 50, seed: int = 0, reg: float = 1e-6) -> None:
        super().__init__()
        check_nonnegative("reg", reg)
        self.components = check_count("components", components)
        self.dim = None if dim is None else check_count("dim", dim)
        self.seed = check_seed("seed", seed)
        self.reg = reg

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> GMM:
        super().fit_statistics(stats, head)
        axes = principal_axes(stats, self.dim)  # (L, D)
        z = stats.bank.to(axes.device, torch.float64) @ axes  # (M, D), uncentred as OpenOOD
        k = self.components
        if len(z) < k:  # sklearn refuses more components than samples
            raise FitError(
                f"its {k} mixture components need at least {k} training features in the bank, which holds "
                f"{len(z)}: lower components to at most {len(z)}, or keep more training images in the bank "
                f"(model.bank_images)"
            )
        weights, means, chol = fit_tied_gmm(z, kmeans_labels(z, k, self.seed), k, self.reg)
        self.whitening = axes @ chol  # (L, D): h -> z U, so that (z - mu)^T P (z - mu) = ||z U - mu U||^2
        self.centres = means @ chol  # (K, D)
        self.log_weights = weights.log()  # (K,)
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        # float64: d_k reaches thousands for far images, and the whitening can be ill-conditioned
        y = features.double() @ self.whitening.double()  # (N, D)
        d = squared_distances(y, self.centres.double())  # (N, K)
        return torch.logsumexp(self.log_weights.double() - 0.5 * d, dim=1)


__all__ = ["GMM", "fit_tied_gmm", "kmeans_labels"]
