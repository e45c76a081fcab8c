"""Drift is not pruning: a broken rule makes a pruning candidate only when its bound is on the
metric's compressible side (or its ``suggest`` says so); everything else is a regression."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pytest_spectral.judging.candidates import pruning_candidates, regression_record, regressions
from pytest_spectral.judging.evaluation import BrokenRule
from pytest_spectral.judging.metrics import METRICS, MetricRegistry, default_request
from pytest_spectral.judging.ranges import IndexSet
from pytest_spectral.judging.rules import Rule
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)


def rule(metric: str, *, suggest: str | None = None, **bounds: float) -> Rule:
    return Rule(
        name="r",
        request=default_request(metric),
        min=bounds.get("min"),
        max=bounds.get("max"),
        matrices=frozenset("qkvo"),
        layers=IndexSet.everything(),
        heads=IndexSet.everything(),
        severity="fail",
        min_change=bounds.get("min_change"),
        max_change=bounds.get("max_change"),
        suggest=suggest,
    )


class TestMetricMetadata:
    def test_every_builtin_metric_declares_its_sides(self) -> None:
        for spec in METRICS.values():
            assert spec.bad in (None, "high", "low", "both"), spec.name
            assert spec.compressible in (None, "high", "low"), spec.name
            if spec.compressible is not None:  # low-rank structure is the bad side too
                assert spec.bad == spec.compressible, spec.name

    @pytest.mark.parametrize(
        ("metric", "side"),
        [
            ("top_k_ratio", "high"),
            ("first_last_ratio", "high"),
            ("effective_rank", "low"),
            ("stable_rank", "low"),
            ("energy_rank", "low"),
            ("spectral_norm", None),
            ("alpha", None),
            ("nonfinite_count", None),
        ],
    )
    def test_compressible_sides(self, metric, side) -> None:
        assert METRICS[metric].compressible == side

    def test_registered_metrics_declare_theirs(self) -> None:
        metrics = MetricRegistry()
        metrics.add("tail", lambda sv: sv[..., -1], bad="low", compressible="low", k=3)
        spec = metrics.specs["tail"]
        assert (spec.bad, spec.compressible, spec.params["k"].default) == ("low", "low", 3)
        with pytest.raises(ValueError, match="compressible must be 'high' or 'low'"):
            metrics.add("other", lambda sv: sv[..., 0], compressible="both")


class TestSuggestion:
    @pytest.mark.parametrize(
        ("metric", "bounds", "value", "bound", "suggestion"),
        [
            ("top_k_ratio", {"max": 0.8}, 0.97, "max", "low_rank"),  # concentrated
            ("top_k_ratio", {"min": 0.2}, 0.1, "min", "none"),  # flat: not compressible
            ("effective_rank", {"min": 8}, 2.5, "min", "low_rank"),  # collapsed
            ("effective_rank", {"max": 30}, 31.0, "max", "none"),
            ("spectral_norm", {"max": 10}, 30.0, "max", "none"),  # blew up
            ("effective_rank", {"min": 8}, math.nan, None, "none"),  # undefined
        ],
    )
    def test_the_broken_bound_decides(self, metric, bounds, value, bound, suggestion) -> None:
        broken = BrokenRule(rule(metric, **bounds), value, "fail", "reason")
        assert (broken.bound, broken.suggestion) == (bound, suggestion)

    def test_a_drift_is_never_compressible(self) -> None:
        broken = BrokenRule(rule("top_k_ratio", max_change=0.1), 0.9, "fail", "r", baseline=0.5)
        assert (broken.bound, broken.suggestion) == ("max_change", "none")
        shrunk = BrokenRule(rule("top_k_ratio", min_change=-0.1), 0.4, "fail", "r", baseline=0.5)
        assert shrunk.bound == "min_change"

    @pytest.mark.parametrize("suggest", ["low_rank", "remove_head", "none"])
    def test_suggest_overrides_the_metric(self, suggest) -> None:
        drift = BrokenRule(
            rule("spectral_norm", max_change=0.5, suggest=suggest), 3, "fail", "r", 1.0
        )
        collapse = BrokenRule(rule("effective_rank", min=8, suggest=suggest), 2, "fail", "r")
        assert drift.suggestion == collapse.suggestion == suggest


def record(nodeid: str, head: int, matrix: str, broken: list[dict], status: str = "ok") -> dict:
    return {
        "nodeid": nodeid,
        "layer": 1,
        "scope": "head",
        "head": head,
        "matrix": matrix,
        "kv_head": head // 2 if matrix in "kv" else None,
        "shape": [8, 32],
        "status": status,
        "outcome": "failed" if broken or status != "ok" else "passed",
        "floor_limited": False,
        "singular_values": [1.0] * 8,
        "metrics": {"energy_rank(p=0.95)": 2.0},
        "broken_rules": broken,
    }


def entry(name: str, suggest: str) -> dict:
    return {"rule": name, "severity": "fail", "baseline": None, "suggest": suggest}


class TestSplit:
    def test_each_slice_goes_where_its_rules_say(self) -> None:
        records = [
            record("q-drift", 0, "q", [entry("drift", "none")]),
            record("q-collapse", 1, "q", [entry("collapsed", "low_rank")]),
            record("q-both", 2, "q", [entry("drift", "none"), entry("collapsed", "low_rank")]),
            record("q-nan", 3, "q", [], status="nonfinite"),
            record("k-2", 2, "k", [entry("drift", "none")]),
            record("k-3", 3, "k", [entry("drift", "none")]),  # shares K/V head 1 with k-2
        ]
        candidates = pruning_candidates(records, "energy_rank(p=0.95)")
        found = regressions(records)
        assert sorted(c.nodeids for c in candidates) == [("q-both",), ("q-collapse",)]
        assert [g.nodeids for g in found] == [("k-2", "k-3"), ("q-both",), ("q-drift",), ("q-nan",)]
        both = next(c for c in candidates if c.nodeids == ("q-both",))
        assert [b["rule"] for b in both.rules] == ["collapsed"]
        assert [g.label for g in found] == ["L1 H2-3 k", "L1 H2 q", "L1 H0 q", "L1 H3 q"]

    def test_the_reports_entry_of_a_regression(self) -> None:
        """A K/V slice two query heads share is one entry: both items, both heads, the rules
        that suggest no pruning (not the others)."""
        records = [
            record("k-2", 2, "k", [entry("drift", "none"), entry("collapsed", "low_rank")]),
            record("k-3", 3, "k", [entry("drift", "none"), entry("collapsed", "low_rank")]),
        ]
        (found,) = regressions(records)
        assert regression_record(found) == {
            "nodeids": ["k-2", "k-3"],
            "stack": None,
            "layer": 1,
            "matrix": "k",
            "heads": [2, 3],
            "kv_head": 1,
            "shape": [8, 32],
            "outcome": "failed",
            "status": "ok",
            "rules": ["drift"],
        }

    def test_a_nonfinite_slice_is_never_a_candidate(self) -> None:
        records = [record("q", 0, "q", [entry("collapsed", "low_rank")], status="nonfinite")]
        assert pruning_candidates(records, "energy_rank(p=0.95)") == []
        assert len(regressions(records)) == 1


def test_a_drift_is_reported_as_a_regression_end_to_end(pytester) -> None:
    """The issue's case: layer 1's q_proj scaled by 3 against a baseline."""
    tensors = random_llama_weights(SHAPE, seed=4)
    good = write_checkpoint(pytester.path / "good", tensors, SHAPE.config())
    tensors[attention_name(1, "q")] *= 3
    scaled = write_checkpoint(pytester.path / "scaled", tensors, SHAPE.config())
    pytester.runpytest(f"--spectral-model={good}", "--spectral-report=good.json")
    (pytester.path / "drift.toml").write_text(
        '[[rules]]\nname = "drift"\nmetric = "spectral_norm"\nmax_change = 0.5\n'
    )
    result = pytester.runpytest(
        f"--spectral-model={scaled}",
        "--spectral-baseline=good.json",
        f"--spectral-thresholds={pytester.path / 'drift.toml'}",
        "--spectral-report=scaled.json",
    )
    result.assert_outcomes(passed=28, failed=4)
    result.stdout.fnmatch_lines(
        [
            "*Regressions*",
            "*L1 H0 q*failed*drift: * vs baseline * (+*%) > +0.5*",
            "4 regressed slices (4 failed, 0 warned): damage rather than compressibility, not",
            "pruning candidates.",
            "No pruning candidates: no broken rule suggests pruning.",
        ]
    )
    assert "Low-rank pruning candidates" not in result.stdout.str()
    report = json.loads((pytester.path / "scaled.json").read_text())
    assert report["schema_version"] == 4
    assert report["candidates"] == []
    assert [r["heads"] for r in report["regressions"]] == [[0], [1], [2], [3]]
    assert {r["rules"] == ["drift"] for r in report["regressions"]} == {True}
    assert (report["summary"]["regressions"], report["summary"]["candidates"]) == (4, 0)
    items = {item["nodeid"]: item for item in report["items"]}
    (broken,) = items["spectral::layer01::head00-q"]["broken_rules"]
    assert (broken["bound"], broken["suggest"]) == ("max_change", "none")


class TestBaselineVersions:
    @pytest.fixture
    def report(self, pytester) -> tuple[Path, dict]:
        model = write_checkpoint(pytester.path / "m", random_llama_weights(SHAPE), SHAPE.config())
        pytester.runpytest(f"--spectral-model={model}", "--spectral-report=r.json")
        return model, json.loads((pytester.path / "r.json").read_text())

    @pytest.mark.parametrize("version", [1, 2, 3, 4])
    def test_versions_one_to_four_are_read(self, pytester, report, version) -> None:
        """Before version 4 a report has no stack, of the model or of an item."""
        model, content = report
        if version < 4:
            items = [{k: v for k, v in item.items() if k != "stack"} for item in content["items"]]
            model_section = {k: v for k, v in content["model"].items() if k != "stacks"}
            content = {**content, "items": items, "model": model_section}
        (pytester.path / "b.json").write_text(json.dumps({**content, "schema_version": version}))
        (pytester.path / "drift.toml").write_text(
            '[[rules]]\nmetric = "spectral_norm"\nmax_change = 0.5\n'
        )
        result = pytester.runpytest(
            f"--spectral-model={model}",
            "--spectral-baseline=b.json",
            f"--spectral-thresholds={pytester.path / 'drift.toml'}",
        )
        result.assert_outcomes(passed=32)

    @pytest.mark.parametrize("version", [5, True, "2"])
    def test_other_versions_are_refused(self, pytester, report, version) -> None:
        model, content = report
        (pytester.path / "b.json").write_text(json.dumps({**content, "schema_version": version}))
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-baseline=b.json")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["*report schema version *; this plugin reads versions 1, 2, 3, 4*"]
        )


def test_a_conftest_metric_without_a_compressible_side_makes_regressions(pytester) -> None:
    model = write_checkpoint(pytester.path / "m", random_llama_weights(SHAPE), SHAPE.config())
    pytester.makeconftest(
        "def pytest_spectral_register_metrics(metrics):\n"
        "    metrics.add('top', lambda sv: sv[..., 0])\n"
        "    metrics.add('top_c', lambda sv: sv[..., 0], compressible='high')\n"
    )
    for metric, section in (("top", "Regressions"), ("top_c", "Low-rank pruning candidates")):
        (pytester.path / "r.toml").write_text(f'[[rules]]\nmetric = "{metric}"\nmax = 0\n')
        result = pytester.runpytest(
            f"--spectral-model={model}", f"--spectral-thresholds={pytester.path / 'r.toml'}"
        )
        result.stdout.fnmatch_lines([f"{section}*"])
