"""The batched power-law fit against WeightWatcher's own WWFit, spectrum by spectrum.

``WWFit`` (weightwatcher 0.7.7) loops over every candidate xmin in plain numpy; the plugin
fits every candidate of every slice at once. Both must pick the same xmin, alpha and KS
distance, for spectra with ties, with values at the zero threshold, and in batches whose
slices keep different numbers of eigenvalues.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_spectral.judging import powerlaw
from pytest_spectral.judging.powerlaw import MIN_EIGENVALUES, ZERO_THRESHOLD, fit_power_laws

ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")


def weightwatcher_fit(singular_values: np.ndarray) -> tuple[float, float, float]:
    """(alpha, D, xmin) of WWFit on the eigenvalues above WeightWatcher's EVALS_THRESH."""
    eigenvalues = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)
    eigenvalues = eigenvalues[eigenvalues > ZERO_THRESHOLD]
    if len(eigenvalues) < MIN_EIGENVALUES:
        return math.nan, math.nan, math.nan
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # WWFit's own ties
        fit = ww_powerlaw.WWFit(eigenvalues)
    return fit.alpha, fit.D, fit.xmin


def spectra(seed: int) -> list[np.ndarray]:
    """Singular values of several shapes: Pareto tails, Gaussian bulks, ties, tiny values."""
    rng = np.random.default_rng(seed)
    pareto = np.sqrt(rng.pareto(rng.uniform(0.5, 3.0), 64) + 1)
    bulk = np.linalg.svd(rng.standard_normal((48, 96)), compute_uv=False)
    ties = np.r_[np.full(10, 0.5), np.full(5, 2.0), np.geomspace(2.0, 40.0, 25)]
    top_ties = np.r_[np.geomspace(0.1, 3.0, 30), np.full(4, 3.0)]
    # values around sqrt(1e-5): some eigenvalues fall at or below the zero threshold
    threshold = np.r_[np.full(6, math.sqrt(ZERO_THRESHOLD)), np.geomspace(1e-3, 1.0, 30)]
    return [pareto, bulk, ties, top_ties, threshold, bulk * 1e-3]


@pytest.mark.parametrize("seed", range(4))
def test_each_spectrum_matches_wwfit(seed: int) -> None:
    for values in spectra(seed):
        fit = fit_power_laws(values[None])
        expected = weightwatcher_fit(values)
        got = (fit.alpha[0], fit.ks_distance[0], fit.xmin[0])
        assert got == pytest.approx(expected, rel=1e-9, nan_ok=True), values


def test_a_batch_fits_each_row_as_if_alone() -> None:
    """Rows with different counts above the zero threshold are fitted in separate groups."""
    rng = np.random.default_rng(7)
    rows = np.sort(np.sqrt(rng.pareto(1.5, (6, 40)) + 1), axis=1)
    rows[1, :10] = 1e-4  # 30 eigenvalues left
    rows[2, :25] = 1e-4  # 15 left: too few to fit
    rows[3] = rows[0]  # identical rows, identical fits
    rows[4, 5] = math.nan  # non-finite: no fit
    fit = fit_power_laws(rows)
    for i, values in enumerate(rows):
        if i == 4:
            assert math.isnan(fit.alpha[i])
            assert math.isnan(fit.xmin[i])
            continue
        expected = weightwatcher_fit(values)
        got = (fit.alpha[i], fit.ks_distance[i], fit.xmin[i])
        assert got == pytest.approx(expected, rel=1e-9, nan_ok=True), i
    assert math.isnan(fit.alpha[2])
    assert fit.alpha[0] == fit.alpha[3]


def test_batch_shape_is_kept() -> None:
    values = np.sqrt(np.random.default_rng(3).pareto(1.0, (2, 3, 25)) + 1)
    fit = fit_power_laws(values)
    assert fit.alpha.shape == fit.ks_distance.shape == fit.xmin.shape == (2, 3)
    assert fit.alpha[1, 2] == pytest.approx(weightwatcher_fit(values[1, 2])[0], rel=1e-9)


def test_chunks_of_candidates_give_the_same_fit(monkeypatch) -> None:
    """Large batches are fitted a few candidate xmins at a time, to bound memory."""
    values = np.stack([values[:34] for values in spectra(1)[:4]])
    whole = fit_power_laws(values)
    monkeypatch.setattr(powerlaw, "_ELEMENTS_PER_CHUNK", 1)  # one candidate per step
    chunked = fit_power_laws(values)
    for field in ("alpha", "ks_distance", "xmin"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field))


def test_float32_input_is_fitted_in_float64() -> None:
    values = spectra(2)[0].astype(np.float32)
    single = fit_power_laws(values[None])
    double = fit_power_laws(values.astype(np.float64)[None])
    assert single.alpha[0] == double.alpha[0]
    assert single.xmin[0] == double.xmin[0]


def test_ties_and_extreme_ranges_leave_no_floating_point_error_unhandled() -> None:
    """An all-equal tail (alpha = inf, 0 * inf in the CDF), a 1e-5..1e10 range and a tight
    cluster far above the rest (alpha near 200: exp overflows for the points below the tail)
    have defined results, even for a caller that makes numpy raise on every floating-point
    error (``np.seterr(all="raise")``)."""
    cases = [
        np.r_[np.geomspace(0.01, 1.0, 20), np.full(5, 2.0)],
        np.geomspace(math.sqrt(2e-5), 1e5, 40),
        np.full(25, 3.0),
        np.sqrt(np.r_[np.geomspace(1e-4, 1e-3, 20), np.linspace(1e4, 1.01e4, 10)]),
    ]
    with np.errstate(all="raise"):
        fits = [fit_power_laws(values[None]) for values in cases]
    for values, fit in zip(cases, fits, strict=True):
        expected = weightwatcher_fit(values)
        got = (fit.alpha[0], fit.ks_distance[0], fit.xmin[0])
        assert got == pytest.approx(expected, rel=1e-9, nan_ok=True)
