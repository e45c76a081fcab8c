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
_CHUNK = 256


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    ks_distance: float
    xmin: float
    spikes: int  # eigenvalues >= xmin: the fitted tail


_FAILED = PowerLawFit(float("nan"), float("nan"), float("nan"), 0)


def fit_power_law(singular_values: np.ndarray) -> PowerLawFit:
    """Fit the tail of the eigenvalues ``singular_values ** 2`` of one matrix."""
    eigenvalues = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)
    if not np.isfinite(eigenvalues).all():
        return _FAILED
    data = eigenvalues[eigenvalues > ZERO_THRESHOLD]
    count = len(data)
    if count < MIN_EIGENVALUES:
        return _FAILED
    logs = np.log(data)
    tail_sums = np.cumsum(logs[::-1])[::-1]  # sum of logs from i to the end
    starts = np.arange(count - 1)
    sizes = (count - starts).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1 + sizes / (tail_sums[:-1] - sizes * logs[:-1])
    distances = np.ones(count - 1)
    for first in range(0, count - 1, _CHUNK):
        block = starts[first : first + _CHUNK]
        distances[block] = _ks_distances(data, block, alphas[block])
    best = int(np.argmin(distances))
    return PowerLawFit(
        float(alphas[best]), float(distances[best]), float(data[best]), int(count - best)
    )


def _ks_distances(data: np.ndarray, starts: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """KS distance of each candidate tail ``data[start:]`` from its fitted power law."""
    count = len(data)
    positions = np.arange(count)
    offsets = positions[None, :] - starts[:, None]  # index within each tail
    in_tail = offsets >= 0
    sizes = (count - starts)[:, None].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = data[None, :] / data[starts][:, None]
        theoretical = 1 - ratio ** (1 - alphas[:, None])
        gaps = np.abs(theoretical - offsets / sizes)
    distances = np.where(in_tail, gaps, -np.inf).max(axis=1)
    return np.where(alphas > 1, distances, 1.0)
