"""Hypothesis strategies for property-testing spectral metrics, ours or your own.

Every strategy builds matrices whose singular values are known exactly (random orthogonal
factors around a chosen spectrum), so a property can compare a metric against the truth::

    from hypothesis import given
    from pytest_spectral import strategies as sst

    @given(sst.matrices_with_spectrum(rows=16, cols=64))
    def test_my_metric_sees_the_spectrum(case):
        matrix, spectrum = case
        assert my_metric(numpy.linalg.svd(matrix, compute_uv=False)) == my_metric(spectrum)

Requires hypothesis (in the ``test`` extra).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

__all__ = [
    "heads_with_planted_collapse",
    "low_rank_plus_noise",
    "matrices_with_spectrum",
    "matrix_from_spectrum",
    "singular_values",
]

_SEEDS = st.integers(0, 2**32 - 1)


def singular_values(
    *, min_rank: int = 1, max_rank: int = 64, smallest: float = 1e-4, largest: float = 1e3
) -> st.SearchStrategy[np.ndarray]:
    """Descending, strictly positive float64 spectra of ``min_rank``..``max_rank`` values."""
    return st.lists(
        st.floats(smallest, largest, allow_nan=False, allow_infinity=False),
        min_size=min_rank,
        max_size=max_rank,
    ).map(lambda values: np.sort(np.asarray(values, dtype=np.float64))[::-1].copy())


def matrix_from_spectrum(spectrum: np.ndarray, rows: int, cols: int, seed: int) -> np.ndarray:
    """A ``rows x cols`` matrix whose singular values are ``spectrum`` (padded with zeros)."""
    rank = min(rows, cols)
    values = np.zeros(rank)
    values[: min(rank, len(spectrum))] = np.sort(spectrum)[::-1][:rank]
    rng = np.random.default_rng(seed)
    left, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    right, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    return (left * values) @ right.T


@st.composite
def matrices_with_spectrum(
    draw: st.DrawFn,
    *,
    rows: int = 16,
    cols: int = 64,
    spectrum: st.SearchStrategy[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix, spectrum)``: a matrix with exactly the drawn singular values."""
    rank = min(rows, cols)
    if spectrum is None:
        spectrum = singular_values(min_rank=rank, max_rank=rank)
    values = draw(spectrum)
    return matrix_from_spectrum(values, rows, cols, draw(_SEEDS)), values


@st.composite
def low_rank_plus_noise(
    draw: st.DrawFn,
    *,
    rows: int = 32,
    cols: int = 128,
    max_rank: int = 4,
    noise: float = 1e-3,
) -> tuple[np.ndarray, int]:
    """``(matrix, rank)``: a rank-``rank`` signal of unit-scale singular values plus
    Gaussian noise of entry scale ``noise / sqrt(cols)`` (so the noise's singular values stay
    near ``noise``)."""
    rank = draw(st.integers(1, max_rank))
    signal = np.sort(draw(st.lists(st.floats(1.0, 10.0), min_size=rank, max_size=rank)))[::-1]
    seed = draw(_SEEDS)
    matrix = matrix_from_spectrum(np.asarray(signal), rows, cols, seed)
    rng = np.random.default_rng(seed + 1)
    return matrix + rng.standard_normal((rows, cols)) * noise / np.sqrt(cols), rank


@st.composite
def heads_with_planted_collapse(
    draw: st.DrawFn, *, heads: int = 4, head_dim: int = 8, hidden: int = 32
) -> tuple[np.ndarray, int]:
    """``(weight, head)``: a Q-like ``[heads * head_dim, hidden]`` weight whose head
    ``head`` is collapsed to rank 1 while the others have a flat spectrum."""
    collapsed = draw(st.integers(0, heads - 1))
    seed = draw(_SEEDS)
    blocks = []
    for head in range(heads):
        spectrum = np.ones(head_dim)
        if head == collapsed:
            spectrum = np.r_[1.0, np.zeros(head_dim - 1)]
        blocks.append(matrix_from_spectrum(spectrum, head_dim, hidden, seed + head))
    return np.concatenate(blocks), collapsed
