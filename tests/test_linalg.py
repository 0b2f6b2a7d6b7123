"""lightning_ood.linalg: the rank and pseudo-inverse of fitted covariances, with rounding noise treated as zero, against
scipy's pinvh on exactly known matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import pinvh

from lightning_ood.linalg import pinv_psd, spectrum

pytestmark = pytest.mark.numerics  # run again at another thread count by make test


def low_rank(rank: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """A PSD matrix of the given rank, eigenvalues 1 ... 10 on a random basis (float64)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    values = torch.zeros(size, dtype=torch.float64)
    values[:rank] = torch.linspace(10.0, 1.0, rank, dtype=torch.float64)
    return (basis * values) @ basis.T


def symmetric_noise(size: int, scale: float, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return (noise + noise.T) / 2


@pytest.mark.parametrize("rank", [0, 1, 5, 12])
def test_the_rank_of_an_exact_matrix(rank):
    found = spectrum(low_rank(rank))
    assert found.rank == rank
    assert (found.values[rank:] == 0).all() and (found.values[:rank] > 0).all()


@pytest.mark.parametrize("noise", [1e-15, 1e-13, 1e-11])
def test_rounding_noise_of_either_sign_is_zero(noise):
    """Rank 5 plus symmetric noise (negative eigenvalues among the null space's): the noise is not inverted, so the
    pseudo-inverse is the exact one's up to the noise, not 1 / noise."""
    exact = low_rank(5)
    noisy = exact + symmetric_noise(12, noise)
    assert float(torch.linalg.eigvalsh(noisy)[0]) < 0  # negative rounding noise is there
    found = spectrum(noisy)
    assert found.rank == 5
    torch.testing.assert_close(found.pinv(), pinv_psd(exact), rtol=0, atol=1e3 * noise)
    if noise > 12 * torch.finfo(torch.float64).eps * 10:  # above torch's default cutoff: what it did
        assert float(torch.linalg.pinv(noisy, hermitian=True).abs().max()) > 1 / (100 * noise)


def test_a_full_rank_matrix_is_scipys_pinvh():
    matrix = low_rank(12) + torch.eye(12, dtype=torch.float64) * 1e-3
    np.testing.assert_allclose(pinv_psd(matrix).numpy(), pinvh(matrix.numpy()), rtol=1e-10, atol=1e-12)


def test_a_relative_cutoff_above_the_default_is_taken():
    """pNML's authors' rcond applies where it is larger than L * eps; below, the default floor stands."""
    matrix = low_rank(12)  # eigenvalues 10 ... 1
    assert spectrum(matrix, rtol=0.5).rank == 7  # 10, 9.18, ..., 5.09 are above 5
    assert spectrum(matrix, rtol=1e-30).rank == 12
    assert spectrum(matrix * 0).rank == 0 and spectrum(matrix * 0).cutoff == 0.0
