"""CF-OOD: the Concentration-Free Outlier Factor of the feature among the training features (Angiulli, Fassetti &
Zupi, "CF-OOD: Concentration-Free Density Estimation for Reliable Out-of-Distribution Detection", SISAP 2025;
OpenOOD's ``cfood`` postprocessor, contributed by the authors).

CFOF (Angiulli, ECML PKDD 2017) is a reverse-nearest-neighbour score: the smallest neighbourhood size, as a share
kappa of the reference set, at which the test point is among the kappa-nearest neighbours of at least a share ``k``
of the reference points. As the authors' code (``openood/postprocessors/cfood_postprocessor.py``, ``setup`` lines
58-134, ``postprocess`` lines 136-183):

- the reference set is a random share ``alpha`` of the L2-normalised training features (``int(alpha * N)`` of them;
  all of them when ``alpha`` is 1); here drawn from the ``bank`` by a generator seeded with ``seed`` (the authors'
  ``randperm`` is unseeded), so that every DDP rank and every run has the same set;
- kappa is searched on a fixed grid of 230 shares (``linspace(0.001, 0.1, 100)``, ``(0.105, 0.5, 81)``,
  ``(0.51, 0.99, 49)``), each turned into a neighbour rank ``int(kappa * n - 1)``, repeated ranks dropped; each
  reference point's squared distance to its neighbour of that rank (itself excluded) is computed once;
- a test point's kappa is the first grid share at which the fraction of reference points whose neighbour distance
  is at least the test point's squared distance to them reaches ``k`` (a float32 ratio, as theirs); 1 if none does;
- score = -kappa (higher = more in-distribution): a coarse score, with many ties.

The authors loop over test points; here each test point's search is the ``m``-th smallest, over reference points, of
the first grid rank at which the test point enters that point's neighbourhood (``searchsorted`` on the sorted
neighbour distances), which gives the same kappa with no (test, reference, grid) tensor. Squared distances come
from one matrix product (theirs: sums of squared differences), so a test feature equal to a reference one may fall
on the other side of an exact tie.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lightning_ood.errors import ConfigError, FitError
from lightning_ood.scoring.base import Scorer, as_float, check_number, check_seed
from lightning_ood.scoring.neighbours import unit
from lightning_ood.statistics import Bank, FeatureStatistics

CHUNK = 2048  # reference points per (N, chunk) block of distances


def kappa_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' grid of shares and the neighbour ranks (0 = nearest other point) it gives for n references."""
    shares = np.concatenate(
        (np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49))
    )  # fmt: skip
    ranks = np.array(shares * n - 1, dtype=int)
    keep = np.concatenate(([True], ranks[:-1] < ranks[1:]))
    return shares[keep], ranks[keep]


def squared_distances(a: Tensor, b: Tensor) -> Tensor:  # (N, D), (M, D) -> (N, M)
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min(0)


class CFOOD(Scorer):
    """``score = -kappa``, the CFOF share of the L2-normalised feature among a share ``alpha`` of the training
    features at level ``k``.

    Args:
        alpha: share of the training features kept as the reference set (0.1, OpenOOD ``configs/postprocessors/
            cfood.yml`` line 8 and the postprocessor's default, line 31).
        k: the share of reference points whose neighbourhood must hold the test point (0.01, cfood.yml line 9).
        seed: seeds the draw of the reference set.
    """

    needs_statistics = frozenset({Bank})
    # cfood.yml lines 12-29: alpha in {0.1, 0.5, 1} x k in {0.001, 0.005, 0.01, 0.05}
    search_space: ClassVar[dict[str, tuple]] = {"alpha": (0.1, 0.5, 1.0), "k": (0.001, 0.005, 0.01, 0.05)}

    def __init__(self, alpha: float = 0.1, k: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("k", k)):
            check_number(name, value)
            if not 0 < value <= 1:
                raise ConfigError(f"cfood {name} must be in (0, 1], got {value}.")
        self.alpha = float(alpha)
        self.k = float(k)
        self.seed = check_seed("seed", seed)

    def fit_statistics(self, stats: FeatureStatistics, head: nn.Linear) -> CFOOD:
        super().fit_statistics(stats, head)
        bank = unit(stats.bank.to(self.weight.dtype))  # (N, L)
        total = len(bank)
        n = int(self.alpha * total) if self.alpha < 1.0 else total
        if n < 2:
            raise FitError(
                f"it needs at least 2 reference features, and alpha {self.alpha} of the {total} training features in "
                f"the bank gives {n}: raise alpha, or keep more training images in the bank (model.bank_images)"
            )
        if self.alpha < 1.0:
            order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[:n]
            bank = bank[order.to(bank.device)]
        shares, ranks = kappa_grid(n)
        self.reference = bank.contiguous()  # (n, L)
        columns = torch.as_tensor(ranks + 1, device=bank.device)  # +1: the point itself is its nearest
        self.neighbour_distances = torch.cat(
            [squared_distances(rows, bank).sort(dim=1).values[:, columns] for rows in bank.split(512)]
        ).contiguous()  # (n, grid): nondecreasing along the grid
        self.shares = torch.as_tensor(shares, device=bank.device)  # float64, as the authors' grid
        # the least count m of reference points with float32(m) / float32(n) >= float32(k), the authors' test
        counts = torch.arange(n + 1, dtype=torch.float32) / float(n)
        self.needed = int((counts >= self.k).nonzero()[0])
        return self

    def score(self, features: Tensor, logits: Tensor) -> Tensor:
        x = unit(as_float(features))
        reference, neighbours = self.reference.to(x.dtype), self.neighbour_distances.to(x.dtype)
        smallest = None  # (m', N): the m smallest entry ranks so far
        for start in range(0, len(reference), CHUNK):
            d = squared_distances(x, reference[start : start + CHUNK]).T.contiguous()  # (c, N)
            # first grid rank at which the test point is inside each reference point's neighbourhood
            entry = torch.searchsorted(neighbours[start : start + CHUNK], d)  # (c, N), grid size if never
            candidates = entry if smallest is None else torch.cat([smallest, entry])
            smallest = candidates.topk(min(self.needed, len(candidates)), dim=0, largest=False).values
        rank = smallest.max(dim=0).values  # (N,): the m-th smallest entry rank
        grid = len(self.shares)
        kappa = torch.where(rank < grid, self.shares[rank.clamp_max(grid - 1)], torch.ones((), dtype=x.dtype))
        return -kappa.to(features.dtype)


__all__ = ["CFOOD", "kappa_grid"]
