"""Judging one slice: which rules it breaks, its status and its outcome, by hand."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from pytest_spectral.judging.evaluation import judge
from pytest_spectral.judging.rules import load_rules
from pytest_spectral.reporting.broken_rules import describe_broken
from pytest_spectral.results import HeadSpectrum

RULES = """
[[rules]]
name = "low-rank"
metric = "stable_rank"
min = 2
matrices = ["q"]
layers = "1"
heads = "0-1"

[[rules]]
name = "advisory"
metric = "spectral_norm"
max = 3
severity = "warn"

[[rules]]
name = "ill"
metric = "first_last_ratio"
max = 100

[[rules]]
name = "whole"
metric = "spectral_norm"
max = 0
scope = "matrix"
"""


@pytest.fixture
def rules(tmp_path: Path):
    path = tmp_path / "rules.toml"
    path.write_text(textwrap.dedent(RULES))
    return load_rules(path).rules


def spectrum(
    *, stable_rank: float = 4.0, spectral_norm: float = 1.0, ratio: float = 10.0, **kwargs
) -> HeadSpectrum:
    metrics = {
        "stable_rank": stable_rank,
        "spectral_norm": spectral_norm,
        "first_last_ratio": ratio,
    }
    fields = {"singular_values": [1.0, 0.5], "nonfinite": 0, "method": "gram", **kwargs}
    return HeadSpectrum(metrics=metrics, **fields)


def broken_names(verdict) -> list[str]:
    return [b.rule.name for b in verdict.broken]


class TestStatus:
    def test_healthy_slice_without_rules_passes(self) -> None:
        verdict = judge((), 0, 0, "q", spectrum())
        assert (verdict.status, verdict.outcome, verdict.broken) == ("ok", "passed", ())

    def test_non_finite_weights_fail_without_rules(self) -> None:
        verdict = judge((), 0, 0, "q", spectrum(nonfinite=3))
        assert (verdict.status, verdict.outcome) == ("nonfinite", "failed")

    def test_zero_slice_fails_without_rules(self) -> None:
        verdict = judge((), 0, 0, "q", spectrum(singular_values=[0.0, 0.0]))
        assert (verdict.status, verdict.outcome) == ("zero_matrix", "failed")

    def test_smallest_value_zero_is_not_a_zero_slice(self) -> None:
        assert judge((), 0, 0, "q", spectrum(singular_values=[1.0, 0.0])).status == "ok"

    @pytest.mark.parametrize("problem", [{"nonfinite": 1}, {"singular_values": [0.0]}])
    def test_warn_only_turns_them_into_warnings(self, problem) -> None:
        verdict = judge((), 0, 0, "q", spectrum(**problem), warn_only=True)
        assert verdict.outcome == "warned"
        assert judge((), 0, 0, "q", spectrum(), warn_only=True).outcome == "passed"


class TestWhichRulesJudge:
    def test_rules_apply_only_to_their_layers_heads_matrices_and_scope(self, rules) -> None:
        low = spectrum(stable_rank=1.5)
        assert broken_names(judge(rules, 1, 1, "q", low)) == ["low-rank"]
        assert broken_names(judge(rules, 0, 1, "q", low)) == []  # layer 0 not selected
        assert broken_names(judge(rules, 1, 2, "q", low)) == []  # head 2 not selected
        assert broken_names(judge(rules, 1, 1, "k", low)) == []  # k not selected
        # a whole matrix: only the rule with scope = "matrix"
        assert broken_names(judge(rules, 1, None, "q", low)) == ["whole"]

    def test_a_rule_with_stacks_judges_only_items_of_those_stacks(self, tmp_path) -> None:
        """``stacks = ["encoder", "text"]``: an item in no stack counts as ``text``."""
        path = tmp_path / "stacks.toml"
        path.write_text(
            '[[rules]]\nname = "enc"\nmetric = "spectral_norm"\nmax = 0.5\n'
            'stacks = ["encoder", "text"]\n'
        )
        stacked = load_rules(path).rules
        for stack, judged in [("encoder", True), ("decoder", False), ("cross", False)]:
            verdict = judge(stacked, 0, 0, "q", spectrum(), stack=stack)
            assert broken_names(verdict) == (["enc"] if judged else []), stack
        assert broken_names(judge(stacked, 0, 0, "q", spectrum())) == ["enc"]

    def test_every_broken_rule_is_listed_in_file_order(self, rules) -> None:
        verdict = judge(rules, 1, 0, "q", spectrum(stable_rank=1, spectral_norm=5, ratio=1e3))
        assert broken_names(verdict) == ["low-rank", "advisory", "ill"]
        assert [b.value for b in verdict.broken] == [1, 5, 1e3]
        assert [b.reason for b in verdict.broken] == ["< min 2", "> max 3", "> max 100"]

    def test_values_at_the_bounds_pass(self, rules) -> None:
        verdict = judge(rules, 1, 0, "q", spectrum(stable_rank=2, spectral_norm=3, ratio=100))
        assert verdict.broken == ()
        assert verdict.outcome == "passed"


class TestOutcome:
    def test_only_warn_rules_broken_is_a_warning(self, rules) -> None:
        verdict = judge(rules, 0, 0, "q", spectrum(spectral_norm=5))
        assert [b.severity for b in verdict.broken] == ["warn"]
        assert verdict.outcome == "warned"

    def test_a_fail_rule_fails_whatever_warns_beside_it(self, rules) -> None:
        verdict = judge(rules, 0, 0, "q", spectrum(spectral_norm=5, ratio=1e3))
        assert [b.severity for b in verdict.broken] == ["warn", "fail"]
        assert verdict.outcome == "failed"

    def test_warn_only_makes_every_broken_rule_a_warning(self, rules) -> None:
        verdict = judge(rules, 0, 0, "q", spectrum(spectral_norm=5, ratio=1e3), warn_only=True)
        assert [b.severity for b in verdict.broken] == ["warn", "warn"]
        assert verdict.outcome == "warned"

    def test_undefined_metric_breaks_a_rule(self, rules) -> None:
        verdict = judge(rules, 0, 0, "q", spectrum(ratio=math.nan))
        assert [b.reason for b in verdict.broken] == ["is undefined (nan)"]


def report_entry(broken) -> dict:
    """A broken rule as the report's ``broken_rules`` lists it (the fields wording needs)."""
    rule = broken.rule
    return {
        "rule": rule.name,
        "metric": rule.request.key,
        "value": broken.value,
        "min": rule.min,
        "max": rule.max,
        "min_change": rule.min_change,
        "max_change": rule.max_change,
        "baseline": broken.baseline,
        "bound": broken.bound,
    }


class TestDescriptions:
    """How a broken rule reads in failures, warnings and the summary (one wording)."""

    def test_value_with_six_significant_digits(self, rules) -> None:
        verdict = judge(rules, 0, 0, "q", spectrum(ratio=123.456789))
        entry = report_entry(verdict.broken[0])
        assert describe_broken(entry) == "ill: first_last_ratio = 123.457 > max 100"
        assert describe_broken(entry, short=True, digits=3) == "ill: 123 > 100"

    def test_floor_limited_only_for_the_condition_number(self, rules) -> None:
        limited = spectrum(spectral_norm=5, ratio=400.0, floor_limited=True)
        advisory, ill = (report_entry(b) for b in judge(rules, 0, 0, "q", limited).broken)
        assert describe_broken(advisory, floor_limited=True) == (
            "advisory: spectral_norm = 5 > max 3"
        )
        assert describe_broken(ill, floor_limited=True) == (
            "ill: first_last_ratio >= 400 > max 100 (a lower bound: sigma_min is below the "
            "storage/rounding floor)"
        )
        assert describe_broken(ill) == "ill: first_last_ratio = 400 > max 100"


class TestBaselines:
    RELATIVE = '[[rules]]\nname = "drift"\nmetric = "spectral_norm"\nmax_change = 0.5\n'

    @pytest.fixture
    def drift(self, tmp_path: Path):
        path = tmp_path / "drift.toml"
        path.write_text(self.RELATIVE)
        return load_rules(path).rules

    def test_change_against_the_items_baseline(self, drift) -> None:
        grown = spectrum(spectral_norm=2.0)
        (broken,) = judge(drift, 0, 0, "q", grown, baseline={"spectral_norm": 1.0}).broken
        assert (broken.baseline, broken.reference_step, broken.reason) == (
            1.0,
            None,  # a step names a history report; a baseline has none
            "vs baseline 1 (+100.0%) > max_change +0.5",
        )
        assert judge(drift, 0, 0, "q", grown, baseline={"spectral_norm": 1.5}).broken == ()

    @pytest.mark.parametrize("baseline", [None, {"stable_rank": 4.0}])
    def test_missing_item_or_metric_breaks_the_rule(self, drift, baseline) -> None:
        (broken,) = judge(drift, 0, 0, "q", spectrum(), baseline=baseline).broken
        assert broken.baseline is None
        assert broken.reason.startswith(
            "has no baseline value: the baseline report has no spectral_norm for this item"
        )

    def test_absolute_rules_ignore_the_baseline(self, rules) -> None:
        verdict = judge(rules, 0, 0, "q", spectrum(), baseline=None)
        assert verdict.broken == ()


class TestTrends:
    """A trend rule (``window``) bounds the change against an earlier report of the history,
    which ``judge`` asks for through ``trend``: (value, step) or ``None``."""

    TREND = '[[rules]]\nname = "collapse"\nmetric = "stable_rank"\nmin_change = -0.25\nwindow = 3\n'

    @pytest.fixture
    def collapse(self, tmp_path: Path):
        path = tmp_path / "trend.toml"
        path.write_text(self.TREND)
        return load_rules(path).rules

    def test_change_against_the_history_names_the_step(self, collapse) -> None:
        asked = []

        def trend(rule):
            asked.append(rule.name)
            return 4.0, "1000"

        # 2.0 from 4.0 is -50%, beyond min_change -25%
        (broken,) = judge(collapse, 0, 0, "q", spectrum(stable_rank=2.0), trend=trend).broken
        assert asked == ["collapse"]
        assert (broken.baseline, broken.reference_step, broken.reason) == (
            4.0,
            "1000",
            "vs step 1000 4 (-50.0%) < min_change -0.25",
        )
        assert judge(collapse, 0, 0, "q", spectrum(stable_rank=3.5), trend=trend).broken == ()

    def test_a_trend_rule_ignores_the_baseline(self, collapse) -> None:
        verdict = judge(
            collapse, 0, 0, "q", spectrum(stable_rank=2.0), baseline={"stable_rank": 4.0}
        )
        assert verdict.broken == ()

    def test_no_earlier_report_or_no_history_leaves_it_unjudged(self, collapse) -> None:
        collapsed = spectrum(stable_rank=0.1)
        assert judge(collapse, 0, 0, "q", collapsed, trend=lambda rule: None).broken == ()
        assert judge(collapse, 0, 0, "q", collapsed, trend=None).broken == ()
