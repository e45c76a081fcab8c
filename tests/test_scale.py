"""Heatmaps that show what they exist to show: one scale per metric, from the median to the
rules' bound (or a robust spread), so a collapsed head stands out and healthy ones stay quiet."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_spectral.reporting.heatmap import render_heatmap
from pytest_spectral.reporting.scale import Bound, direction_words, metric_scale


class TestScale:
    def test_reaches_to_the_rule_bound_on_the_bad_side(self) -> None:
        scale = metric_scale("m", [0.4, 0.5, 0.6], bad="high", bounds=[Bound("r", None, 0.8)])
        assert scale.centre == 0.5
        assert (scale.high.value, scale.high.why) == (0.8, "rule 'r' max")
        assert scale.badness(0.8) == pytest.approx(1.0)
        assert scale.badness(0.65) == pytest.approx(0.5)
        assert scale.badness(0.1) == 0.0  # low is harmless for this metric

    def test_the_tightest_bound_beyond_the_median_wins(self) -> None:
        bounds = [Bound("loose", None, 0.9), Bound("tight", None, 0.6), Bound("below", None, 0.3)]
        scale = metric_scale("m", [0.4, 0.5, 0.6], bad="high", bounds=bounds)
        assert scale.high.value == 0.6  # 0.3 is below the median: no reach on the high side

    def test_robust_reach_is_five_mad_standard_deviations(self) -> None:
        """Hand values: median 3, absolute deviations 2, 1, 0, 1, 97, MAD 1."""
        scale = metric_scale("m", [1, 2, 3, 4, 100], bad="both")
        assert scale.centre == 3
        assert scale.high.value == pytest.approx(3 + 5 * 1.4826)
        assert scale.high.why == "5 robust SD"
        assert scale.badness(100) > 1  # the outlier saturates
        assert scale.badness(4) < 0.25  # ordinary variation stays quiet

    def test_a_non_negative_metric_is_not_given_a_negative_reach(self) -> None:
        scale = metric_scale("m", [1, 2, 3, 4, 100], bad="low")
        assert (scale.low.value, scale.low.why) == (0.0, "5 robust SD would reach below 0")
        assert scale.badness(0.0) == pytest.approx(1.0)

    def test_log_scales_measure_in_decades(self) -> None:
        scale = metric_scale(
            "m", [10, 100, 1000], bad="high", bounds=[Bound("r", None, 10_000)], log=True
        )
        assert scale.centre == pytest.approx(100)
        assert scale.badness(1000) == pytest.approx(0.5)  # one decade of two

    def test_a_collapse_is_louder_than_any_healthy_head(self) -> None:
        """The issue's case: healthy top_k_ratio 0.42-0.51, one collapsed head at 0.974."""
        rng = np.random.default_rng(0)
        healthy = rng.uniform(0.42, 0.51, size=127)
        scale = metric_scale("top_k_ratio", [*healthy, 0.974], bad="high")
        assert scale.badness(0.974) >= 1
        assert max(scale.badness(v) for v in healthy) < 0.5

    @pytest.mark.parametrize(
        ("bad", "words"),
        [
            ("high", "high is bad"),
            ("low", "low is bad"),
            ("both", "both extremes are suspect"),
            (None, "neither direction is bad by itself"),
        ],
    )
    def test_legends_say_which_side_is_bad(self, bad, words) -> None:
        assert direction_words(bad) == words
        assert metric_scale("m", [1.0, 2.0, 3.0], bad=bad).legend().startswith(words)


def head_records(values: np.ndarray, matrix: str = "q") -> list[dict]:
    layers, heads = values.shape
    return [
        {
            "layer": layer,
            "head": head,
            "matrix": matrix,
            "metrics": {"m": float(values[layer, head])},
        }
        for layer in range(layers)
        for head in range(heads)
    ]


class TestTerminalHeatmap:
    VALUES = np.random.default_rng(1).uniform(0.42, 0.51, size=(4, 8))

    def render(self, values: np.ndarray, **scale: object) -> list[str]:
        text = render_heatmap(
            head_records(values), "m", layers=4, heads=8, width=80, color=False, **scale
        )
        return text.splitlines()

    def test_the_outlier_is_darkest_and_healthy_heads_light_at_most(self) -> None:
        values = self.VALUES.copy()
        values[1, 2] = 0.974
        lines = self.render(values, bad="high")
        rows = [line for line in lines if line[:3].strip().isdigit()]
        shades = "".join(row[5:13] for row in rows)
        assert shades[8 + 2] == "█"
        assert set(shades[: 8 + 2] + shades[8 + 3 :]) <= {" ", "░"}

    def test_the_range_line_is_the_true_range_and_names_the_furthest_head(self) -> None:
        values = self.VALUES.copy()
        values[1, 2] = 0.974
        lines = self.render(values, bad="high")
        low = f"{values.min():.4g}"
        assert f"q: {low}..0.974; furthest: L1 H2 0.974" in lines

    def test_a_rule_bound_sets_full_shade(self) -> None:
        values = self.VALUES.copy()
        values[0, 0] = 0.6
        lines = self.render(values, bad="high", bounds=[Bound("vo", None, 0.6)])
        rows = [line for line in lines if line[:3].strip().isdigit()]
        assert rows[0][5] == "█"
        assert "to 0.6 (rule 'vo' max)" in " ".join(lines)

    def test_the_legend_says_which_side_is_bad(self) -> None:
        text = " ".join(self.render(self.VALUES, bad="low"))
        assert "m per head (rows: layers, columns: heads): low is bad; one scale for" in text

    def test_undefined_values_are_marked(self) -> None:
        values = self.VALUES.copy()
        values[3, 7] = np.nan
        lines = self.render(values, bad="high")
        rows = [line for line in lines if line[:3].strip().isdigit()]
        assert rows[3][12] == "x"
        assert any(line.endswith("; 1 undefined") for line in lines)
