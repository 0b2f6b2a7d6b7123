"""Eigen-decompositions and pseudo-inverses of fitted symmetric positive semi-definite matrices (covariances, second
moments), with their rounding noise treated as zero.

A covariance estimated from data is positive semi-definite in exact arithmetic; in floating point its null space
(dead units, duplicated units, fewer images than units) comes out as eigenvalues of rounding size and either sign.
Inverting them turns rounding into scores of 1e16. :func:`spectrum` keeps an eigenvalue only above a cutoff relative
to the largest one, ``rtol * lambda_max`` with ``rtol = L * eps`` (float64's eps), the default of
``scipy.linalg.pinvh`` (which sklearn's ``EmpiricalCovariance`` calls), raised to the magnitude of the most negative
eigenvalue when there is one: a negative eigenvalue of a positive semi-definite matrix is rounding noise by
definition, and shows how large the noise of the others can be. What is kept is inverted; the rest counts as zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues (descending, rounding noise set to 0) and eigenvectors (columns) of a symmetric PSD matrix.

    Attributes:
        values: (L,) float64, descending; those at or below ``cutoff`` are 0.
        vectors: (L, L) float64, column ``i`` the eigenvector of ``values[i]``.
        cutoff: the noise level below which an eigenvalue counts as zero.
        rank: how many eigenvalues are above the cutoff (0: the matrix is zero up to rounding).
    """

    values: Tensor
    vectors: Tensor
    cutoff: float
    rank: int

    def pinv(self) -> Tensor:
        """(L, L) the pseudo-inverse: ``V diag(1 / lambda) V^T`` over the eigenvalues above the cutoff."""
        kept = self.vectors[:, : self.rank]
        return (kept / self.values[: self.rank]) @ kept.T


def spectrum(matrix: Tensor, rtol: float | None = None) -> Spectrum:
    """The eigen-decomposition of a fitted symmetric PSD ``matrix`` (L, L), in float64, with eigenvalues at or below
    ``max(rtol * lambda_max, -lambda_min)`` treated as zero (see the module docstring).

    Args:
        matrix: a covariance or second moment; symmetrised first.
        rtol: the relative cutoff; ``None`` or anything below ``L * eps``: ``L * eps`` (scipy's ``pinvh``).
    """
    m = matrix.detach().double()
    m = (m + m.T) / 2
    values, vectors = torch.linalg.eigh(m)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    size = m.shape[0]
    relative = max(rtol or 0.0, size * EPS)
    largest = float(values[0]) if size else 0.0
    cutoff = max(relative * max(largest, 0.0), -float(values[-1]) if size else 0.0, 0.0)
    above = values > cutoff
    rank = int(above.sum())
    return Spectrum(torch.where(above, values, 0.0), vectors, cutoff, rank)


def pinv_psd(matrix: Tensor, rtol: float | None = None) -> Tensor:
    """The pseudo-inverse of a fitted symmetric PSD ``matrix`` with its rounding noise treated as zero (float64)."""
    return spectrum(matrix, rtol).pinv()
