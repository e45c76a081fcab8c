"""Metrics: hand-computed values, defined edge cases, and properties checked with hypothesis."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pytest_spectral import metrics as m

INF, NAN = float("inf"), float("nan")


def sv(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


class TestHandComputedValues:
    def test_top_and_least_k_ratio(self) -> None:
        s = sv(4, 3, 2, 1)
        assert m.top_k_ratio(s, k=2).item() == pytest.approx(0.7)
        assert m.least_k_ratio(s, k=2).item() == pytest.approx(0.3)

    def test_order_of_input_does_not_matter(self) -> None:
        assert m.top_k_ratio(sv(1, 4, 2, 3), k=1).item() == pytest.approx(0.4)

    def test_first_last_ratio_and_norms(self) -> None:
        s = sv(4, 3, 2, 1)
        assert m.first_last_ratio(s).item() == 4
        assert m.spectral_norm(s).item() == 4
        assert m.frobenius_norm(s).item() == pytest.approx(math.sqrt(30))
        assert m.stable_rank(s).item() == pytest.approx(30 / 16)

    def test_effective_rank_of_equal_values_is_their_count(self) -> None:
        assert m.effective_rank(sv(2, 2, 2, 2, 2)).item() == pytest.approx(5)

    def test_effective_rank_uses_l1_normalisation(self) -> None:
        p = np.array([3, 1]) / 4
        expected = math.exp(-(p * np.log(p)).sum())
        assert m.effective_rank(sv(3, 1)).item() == pytest.approx(expected)

    def test_energy_rank(self) -> None:
        # energies 16, 9, 4, 1 of 30: cumulative shares 0.533, 0.833, 0.967, 1
        s = sv(4, 3, 2, 1)
        assert m.energy_rank(s, p=0.5).item() == 1
        assert m.energy_rank(s, p=0.9).item() == 3
        assert m.energy_rank(s, p=1.0).item() == 4


class TestEdgeCases:
    def test_zero_matrix_gives_nan_ratios_and_zero_norms(self) -> None:
        zero = np.zeros(8)
        for name in (
            "top_k_ratio",
            "least_k_ratio",
            "first_last_ratio",
            "stable_rank",
            "effective_rank",
            "energy_rank",
        ):
            assert math.isnan(m.METRICS[name].function(zero).item()), name
        assert m.spectral_norm(zero).item() == 0
        assert m.frobenius_norm(zero).item() == 0

    def test_first_last_ratio_is_inf_when_smallest_is_zero(self) -> None:
        assert m.first_last_ratio(sv(2, 1, 0)).item() == INF

    def test_k_larger_than_rank_is_clamped(self) -> None:
        assert m.top_k_ratio(sv(3, 2, 1), k=10).item() == 1.0
        assert m.least_k_ratio(sv(3, 2, 1), k=10).item() == 1.0

    @pytest.mark.parametrize("bad", [NAN, INF])
    def test_non_finite_input_gives_nan_everywhere(self, bad: float) -> None:
        s = sv(3, bad, 1)
        for name, spec in m.METRICS.items():
            assert math.isnan(spec.function(s).item()), name

    def test_batched_form_equals_row_by_row(self) -> None:
        batch = np.random.default_rng(0).random((5, 12))
        for spec in m.METRICS.values():
            rows = np.stack([spec.function(row) for row in batch])
            np.testing.assert_array_equal(spec.function(batch), rows)

    def test_torch_tensors_are_accepted(self) -> None:
        values = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float32)
        assert m.top_k_ratio(values, k=2).item() == pytest.approx(0.7)


class TestMetricRequests:
    def test_default_parameters_keep_the_plain_name(self) -> None:
        assert m.default_request("top_k_ratio").key == "top_k_ratio"
        assert m.default_request("top_k_ratio", k=5).key == "top_k_ratio(k=5)"
        assert m.default_request("energy_rank", p=0.95).key == "energy_rank(p=0.95)"


spectra = arrays(
    np.float64,
    st.integers(1, 40),
    elements=st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False),
)
matrices = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))


def matrix_from(shape_seed: tuple[int, int, int]) -> np.ndarray:
    rows, cols, seed = shape_seed
    return np.random.default_rng(seed).standard_normal((rows, cols))


def svals(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a, compute_uv=False)


class TestProperties:
    @given(spectra, st.integers(1, 50))
    def test_ratios_lie_in_unit_interval_and_sum_to_one_at_full_rank(self, values, k) -> None:
        s = values
        top, least = m.top_k_ratio(s, k).item(), m.least_k_ratio(s, k).item()
        assert 0 < top <= 1 + 1e-12
        assert 0 < least <= 1 + 1e-12
        r = len(values)
        if k < r:
            assert m.top_k_ratio(s, k).item() + m.least_k_ratio(s, r - k).item() == pytest.approx(1)

    @given(spectra, st.integers(1, 49))
    def test_top_k_grows_and_least_k_grows_with_k(self, values, k) -> None:
        s = values
        assert m.top_k_ratio(s, k + 1).item() >= m.top_k_ratio(s, k).item() - 1e-12
        assert m.least_k_ratio(s, k + 1).item() >= m.least_k_ratio(s, k).item() - 1e-12
        assert m.top_k_ratio(s, k).item() >= m.least_k_ratio(s, k).item() - 1e-12

    @given(spectra)
    def test_ranks_lie_between_one_and_r(self, values) -> None:
        s, r = values, len(values)
        for name in ("stable_rank", "effective_rank", "energy_rank"):
            value = m.METRICS[name].function(s).item()
            assert 1 - 1e-9 <= value <= r + 1e-9, name
        assert m.first_last_ratio(s).item() >= 1

    @given(spectra, st.floats(1e-3, 1e3))
    def test_scale_invariance(self, values, scale) -> None:
        s = values
        for name in (
            "top_k_ratio",
            "least_k_ratio",
            "first_last_ratio",
            "stable_rank",
            "effective_rank",
        ):
            f = m.METRICS[name].function
            assert f(s * scale).item() == pytest.approx(f(s).item(), rel=1e-9), name
        assert m.spectral_norm(s * scale).item() == pytest.approx(scale * m.spectral_norm(s).item())
        assert m.frobenius_norm(s * scale).item() == pytest.approx(
            scale * m.frobenius_norm(s).item()
        )

    @given(spectra, st.floats(0.05, 1.0), st.floats(0.05, 1.0))
    def test_energy_rank_is_monotone_in_p(self, values, p1, p2) -> None:
        s = values
        low, high = sorted((p1, p2))
        assert m.energy_rank(s, low).item() <= m.energy_rank(s, high).item()

    @settings(max_examples=50)
    @given(matrices, st.integers(0, 2**32 - 1))
    def test_invariant_under_orthogonal_transforms(self, shape_seed, seed) -> None:
        a = matrix_from(shape_seed)
        rng = np.random.default_rng(seed)
        left, _ = np.linalg.qr(rng.standard_normal((a.shape[0], a.shape[0])))
        right, _ = np.linalg.qr(rng.standard_normal((a.shape[1], a.shape[1])))
        before, after = svals(a), svals(left @ a @ right)
        for name, spec in m.METRICS.items():
            if name in ("first_last_ratio", "energy_rank"):
                continue  # sensitive to the rounding of tiny or tied values
            assert spec.function(after).item() == pytest.approx(
                spec.function(before).item(), rel=1e-8
            ), name

    @settings(max_examples=50)
    @given(matrices)
    def test_norms_agree_with_numpy(self, shape_seed) -> None:
        a = matrix_from(shape_seed)
        s = svals(a)
        assert m.spectral_norm(s).item() == pytest.approx(np.linalg.norm(a, 2), rel=1e-12)
        assert m.frobenius_norm(s).item() == pytest.approx(np.linalg.norm(a, "fro"), rel=1e-12)
        assert m.first_last_ratio(s).item() == pytest.approx(np.linalg.cond(a), rel=1e-9)

    def test_rank_one_matrix(self) -> None:
        a = np.outer(np.arange(1, 9), np.arange(1, 5)).astype(float)
        s = svals(a)
        assert m.stable_rank(s).item() == pytest.approx(1)
        assert m.energy_rank(s, 0.999).item() == 1
        assert m.top_k_ratio(s, 1).item() == pytest.approx(1)

    def test_identity_is_perfectly_spread(self) -> None:
        s = svals(np.eye(16))
        assert m.stable_rank(s).item() == pytest.approx(16)
        assert m.effective_rank(s).item() == pytest.approx(16)
        assert m.first_last_ratio(s).item() == pytest.approx(1)
