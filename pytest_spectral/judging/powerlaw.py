"""Power-law fit of an eigenvalue tail, the heavy-tailed self-regularisation alpha.

The fit is WeightWatcher's default (``WWFit``, 0.7.7), re-derived so that the numbers agree:
eigenvalues ``lambda = sigma^2`` at or below 1e-5 are dropped; every remaining eigenvalue
but the largest is tried as ``xmin``; for each, the continuous maximum-likelihood exponent
``alpha = 1 + n / sum(ln(lambda_i / xmin))`` over the ``n`` eigenvalues ``>= xmin``, and the
Kolmogorov-Smirnov distance between the tail's empirical CDF and ``1 - (x/xmin)^(1-alpha)``;
the ``xmin`` with the smallest distance wins (Clauset, Shalizi & Newman 2009).

Below :data:`MIN_EIGENVALUES` eigenvalues the fit is not attempted (``nan``): WeightWatcher
switches to a different small-sample estimator there, and an exponent from a handful of points
means little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: eigenvalues at or below this are treated as zero (WeightWatcher's EVALS_THRESH)
ZERO_THRESHOLD = 1e-5
MIN_EIGENVALUES = 20
#: bound on the temporary [rows, candidates, eigenvalues] array of the KS distances
_ELEMENTS_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class PowerLawFits:
    """Fits of a batch of spectra, one entry per slice (``nan`` where not fitted)."""

    alpha: np.ndarray
    ks_distance: np.ndarray
    xmin: np.ndarray


def fit_power_laws(singular_values: np.ndarray) -> PowerLawFits:
    """Fit the tail of ``singular_values ** 2`` for every row of a ``[slices, r]`` batch.

    Rows with the same number of eigenvalues above the zero threshold (usually all of them)
    are fitted together, every candidate ``xmin`` of every row at once.
    """
    values = np.asarray(singular_values, dtype=np.float64)
    batch = values.reshape(-1, values.shape[-1])
    eigenvalues = np.sort(batch * batch, axis=1)
    finite = np.isfinite(eigenvalues).all(axis=1)
    counts = np.where(finite, (eigenvalues > ZERO_THRESHOLD).sum(axis=1), 0)
    alpha, distance, xmin = (np.full(len(batch), np.nan) for _ in range(3))
    for count in np.unique(counts[counts >= MIN_EIGENVALUES]):
        rows = np.flatnonzero(counts == count)
        fitted = _fit_equal_length(eigenvalues[rows, -count:])
        alpha[rows], distance[rows], xmin[rows] = fitted
    shape = values.shape[:-1]
    return PowerLawFits(alpha.reshape(shape), distance.reshape(shape), xmin.reshape(shape))


def _fit_equal_length(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WWFit on each row of ``data`` (ascending eigenvalues above the threshold)."""
    rows, count = data.shape
    logs = np.log(data)
    tail_sums = np.cumsum(logs[:, ::-1], axis=1)[:, ::-1]  # sum of logs from i to the end
    starts = np.arange(count - 1)
    sizes = (count - starts).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1 + sizes / (tail_sums[:, :-1] - sizes * logs[:, :-1])
    distances = np.ones((rows, count - 1))
    chunk = max(1, _ELEMENTS_PER_CHUNK // (rows * count))
    positions = np.arange(count)
    for first in range(0, count - 1, chunk):
        block = starts[first : first + chunk]
        offsets = positions[None, :] - block[:, None]  # index within each candidate tail
        outside = offsets < 0
        # theoretical CDF 1 - (x / xmin)^(1 - alpha), with the power taken in log space
        gaps = logs[:, None, :] - logs[:, block, None]
        with np.errstate(over="ignore", invalid="ignore"):
            gaps *= (1 - alphas[:, block])[:, :, None]
            gaps[np.isnan(gaps)] = 0  # x == xmin with an infinite alpha: (x/xmin)^-inf is 1
            np.exp(gaps, out=gaps)
        np.subtract(1, gaps, out=gaps)
        gaps -= (offsets / sizes[block][:, None])[None]  # empirical CDF
        np.abs(gaps, out=gaps)
        gaps[:, outside] = 0  # distances are >= 0, so 0 never wins the max
        found = gaps.max(axis=2)
        distances[:, block] = np.where(alphas[:, block] > 1, found, 1.0)
    best = np.argmin(distances, axis=1)
    picked = np.arange(rows)
    return alphas[picked, best], distances[picked, best], data[picked, best]
