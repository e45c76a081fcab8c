"""Independent reference implementations, written from the definitions, for the tests.

Deliberately plain (loops, scipy quadrature) and sharing no code with the package, so that a
test comparing against them compares two implementations, not one with itself.
"""

from __future__ import annotations

import numpy as np


def gavish_donoho_spikes(values: np.ndarray, small: int, large: int) -> int:
    """Gavish & Donoho (2014), unknown noise: #sigma > omega(beta) median(sigma), with their
    cubic approximation omega(beta) = 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43."""
    beta = small / large
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return int((values > omega * np.median(values)).sum())


def marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law of ratio beta <= 1, unit variance (scipy quadrature)."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    low, high = (1 - beta**0.5) ** 2, (1 + beta**0.5) ** 2

    def density(x: float) -> float:
        return np.sqrt(max((high - x) * (x - low), 0.0)) / (2 * np.pi * beta * x)

    def mass_below(x: float) -> float:
        return quad(density, low, x, limit=200)[0]

    return brentq(lambda x: mass_below(x) - 0.5, low, high, xtol=1e-12)


def marchenko_pastur_spikes(values: np.ndarray, small: int, large: int) -> int:
    """#sigma above the MP bulk edge (sqrt(m) + sqrt(n)) noise, widened by min(m, n)^(-2/3) for
    Tracy-Widom fluctuations, the noise level set by the median sigma (README, Metrics)."""
    noise = np.median(values) / np.sqrt(large * marchenko_pastur_median(small / large))
    edge = noise * (np.sqrt(small) + np.sqrt(large)) * (1 + small ** (-2 / 3))
    return int((values > edge).sum())
