"""Heatmaps that show what they exist to show: one scale per metric, from the median to the
rules' bound (or a robust spread), so a collapsed head stands out and healthy ones stay quiet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_spectral.judging.metrics import MetricRegistry
from pytest_spectral.judging.rules import Rule, load_rules
from pytest_spectral.reporting.heatmap import render_heatmap
from pytest_spectral.reporting.scale import Bound, cell_scales, direction_words, metric_scale


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


def rules(tmp_path: Path, *bounds: tuple[str, str, float], extra: str = "") -> tuple[Rule, ...]:
    """Rules bounding metric ``m`` (registered for the test) from above: (name, matrices, max)."""
    path = tmp_path / "rules.toml"
    path.write_text(
        "".join(
            f'[[rules]]\nname = "{name}"\nmetric = "m"\nmax = {bound}\n'
            f"matrices = {list(matrices)!r}\n{extra}\n"
            for name, matrices, bound in bounds
        ).replace("'", '"')
    )
    registry = MetricRegistry()
    registry.add("m", lambda sv: sv[..., 0], bad="high")
    return load_rules(path, registry.specs).rules


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

    def test_a_rule_bound_sets_full_shade(self, tmp_path) -> None:
        values = self.VALUES.copy()
        values[0, 0] = 0.6
        lines = self.render(values, bad="high", rules=rules(tmp_path, ("vo", "q", 0.6)))
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


class TestEachCellReachesToTheRulesThatJudgeIt:
    """The reviewer's case: q/k bounded at 0.99, v/o at 0.5; a q head at 0.974 passes its rule
    and must not be drawn at or beyond a bound written for v and o."""

    VALUES = np.random.default_rng(2).uniform(0.42, 0.48, size=(4, 8))

    def records(self) -> list[dict]:
        q = self.VALUES.copy()
        q[1, 2] = 0.974
        return [*head_records(q, "q"), *head_records(self.VALUES, "v")]

    def test_a_passing_head_is_not_drawn_beyond_another_matrixs_bound(self, tmp_path) -> None:
        judged = rules(tmp_path, ("qk", "qk", 0.99), ("vo", "vo", 0.5))
        text = render_heatmap(
            self.records(), "m", layers=4, heads=8, width=80, color=False, bad="high", rules=judged
        )
        legend = " ".join(text.split("\n\n")[0].splitlines())
        assert "from the median" in legend
        assert "to 0.99 (rule 'qk' max) for q; 0.5 (rule 'vo' max) for v." in legend
        q_rows = [line[5:13] for line in text.splitlines() if line[:3].strip().isdigit()]
        # (0.974 - median) / (0.99 - median) is about 0.97: the last quarter, not full
        assert q_rows[1][2] == "▓"

    def test_cells_outside_a_rules_layers_use_the_robust_reach(self, tmp_path) -> None:
        judged = rules(tmp_path, ("early", "q", 0.6), extra='layers = "0-1"')
        cells = {(r["layer"], r["head"], r["matrix"]): r["metrics"]["m"] for r in self.records()}
        scales = cell_scales("m", cells, bad="high", rules=judged)
        assert scales[(0, 0, "q")].high.why == "rule 'early' max"
        assert scales[(2, 0, "q")].high.why == "5 robust SD"
        assert scales[(0, 0, "v")].high.why == "5 robust SD"
        assert scales[(0, 0, "q")].centre == scales[(2, 0, "v")].centre  # one centre

    def test_the_legend_names_partial_panels_by_layers(self, tmp_path) -> None:
        judged = rules(tmp_path, ("early", "q", 0.6), extra='layers = "0-1"')
        text = " ".join(
            render_heatmap(
                self.records(), "m", layers=4, heads=8, width=200, color=False, bad="high",
                rules=judged,
            ).splitlines()
        )  # fmt: skip
        assert "0.6 (rule 'early' max) for q layers 0-1;" in text
        assert "(5 robust SD) for q layers 2-3, v." in text


class TestWholeMatrixView:
    def records(self) -> list[dict]:
        return [
            {"layer": layer, "head": None, "matrix": matrix, "status": "ok",
             "metrics": {"m": 3.0 + 0.01 * layer + (3.0 if (layer, matrix) == (2, "down") else 0)}}
            for layer in range(4)
            for matrix in ("q", "k", "v", "o", "gate", "up", "down")
        ]  # fmt: skip

    def test_layers_down_matrices_across(self) -> None:
        text = render_heatmap(self.records(), "m", layers=4, heads=8, width=80, color=False)
        lines = text.splitlines()
        assert "m per whole matrix (rows: layers, columns: matrices):" in lines[0]
        assert "m per head" not in text  # no head items: no head view, no empty legend
        header = next(line for line in lines if line.startswith("     q"))
        assert header.split() == ["q", "k", "v", "o", "gate", "up", "down"]
        row = next(line for line in lines if line.startswith("  2  "))
        assert row[header.index("down")] == "█"
        assert "down: 3..6.02; furthest: L2 6.02" in lines

    def test_no_values_at_all_is_one_line(self) -> None:
        records = [{"layer": 0, "head": 0, "matrix": "q", "status": "no_result", "metrics": {}}]
        text = render_heatmap(records, "m", layers=1, heads=1, width=80, color=False)
        assert text == "m: no collected item has a value of it to draw.\n"
