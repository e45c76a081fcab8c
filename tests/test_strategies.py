"""The public hypothesis strategies, and properties of the metrics and engine built on them."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_spectral.compute.spectra import slice_singular_values
from pytest_spectral.judging import metrics
from pytest_spectral.testing import strategies as sst


@given(sst.matrices_with_spectrum(rows=12, cols=40))
def test_matrices_have_exactly_the_drawn_spectrum(case) -> None:
    matrix, spectrum = case
    # Any float64 SVD is exact to about eps * sigma_max in absolute terms.
    floor = spectrum[0] * 1e-13
    np.testing.assert_allclose(
        np.linalg.svd(matrix, compute_uv=False), spectrum, rtol=1e-9, atol=floor
    )


@given(sst.matrices_with_spectrum(rows=16, cols=48))
def test_engine_recovers_the_spectrum(case) -> None:
    matrix, spectrum = case
    result = slice_singular_values(torch.from_numpy(matrix)[None])
    floor = spectrum[0] * 1e-13
    np.testing.assert_allclose(result.singular_values[0], spectrum, rtol=1e-9, atol=floor)


@given(sst.low_rank_plus_noise(rows=24, cols=96, max_rank=5, noise=1e-3))
def test_low_rank_signal_stands_out_of_the_noise(case) -> None:
    matrix, rank = case
    values = np.linalg.svd(matrix, compute_uv=False)
    assert values[rank - 1] > 0.99  # Weyl: noise moves each value by at most its norm
    assert rank == len(values) or values[rank] < 0.01
    assert metrics.energy_rank(values, p=0.999).item() <= rank


@settings(max_examples=30)
@given(sst.heads_with_planted_collapse(heads=6, head_dim=8, hidden=48))
def test_collapsed_head_is_the_one_with_stable_rank_one(case) -> None:
    weight, collapsed = case
    blocks = torch.from_numpy(weight).view(6, 8, 48)
    ranks = metrics.stable_rank(slice_singular_values(blocks).singular_values)
    assert int(np.argmin(ranks)) == collapsed
    np.testing.assert_allclose(ranks[collapsed], 1.0, rtol=1e-9)
    np.testing.assert_allclose(np.delete(ranks, collapsed), 8.0, rtol=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_random_matrices_follow_marchenko_pastur(seed: int) -> None:
    """Gaussian m x n with entry variance 1/n: sigma in [1 - sqrt(m/n), 1 + sqrt(m/n)]."""
    m, n = 128, 512
    matrix = np.random.default_rng(seed).standard_normal((m, n)) / np.sqrt(n)
    values = np.linalg.svd(matrix, compute_uv=False)
    edge = np.sqrt(m / n)
    assert abs(values[0] - (1 + edge)) < 0.1
    assert abs(values[-1] - (1 - edge)) < 0.1
    # Near-random heads have effective rank close to r: well above any collapse threshold.
    assert metrics.effective_rank(values).item() > 0.9 * m
