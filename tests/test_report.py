"""The JSON report's records and document, field by field (README, JSON report)."""

from __future__ import annotations

import json
import math
import platform
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pytest_spectral import __version__
from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.judging.evaluation import judge
from pytest_spectral.judging.rules import RuleSet, load_rules
from pytest_spectral.reporting.report import (
    build_report,
    item_record,
    json_number,
    unrecorded_record,
    write_report,
    write_text_atomically,
)
from pytest_spectral.results import HeadSpectrum

RULES = """
[[rules]]
name = "ill"
metric = "first_last_ratio"
max = 100
suggest = "remove_head"

[[rules]]
name = "drift"
metric = "spectral_norm"
min_change = -0.1
max_change = 0.1
severity = "warn"
"""


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    path = tmp_path / "rules.toml"
    path.write_text(textwrap.dedent(RULES))
    return load_rules(path)


def spectrum(**changes: object) -> HeadSpectrum:
    fields = {
        "singular_values": [2.0, 0.5],
        "metrics": {"first_last_ratio": 400.0, "spectral_norm": 2.0, "alpha": math.nan},
        "nonfinite": 0,
        "method": "svd",
        "floor_limited": True,
    }
    return HeadSpectrum(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "written"),
    [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (1.5, 1.5), (0.0, 0.0)],
)
def test_json_number(value: float, written: object) -> None:
    assert json_number(value) == written
    assert type(json_number(value)) is type(written)


def test_record_of_an_item_without_a_result() -> None:
    """An item that crashed, raised, was skipped or never ran has the keys of every record (a
    report reader needs no special case), where it is, its outcome and pytest's error line,
    and no values: status ``no_result``."""
    record = unrecorded_record(
        nodeid="spectral::cross::layer02::head01-v",
        stack="cross",
        layer=2,
        head=1,
        matrix="v",
        kv_head=1,
        shape=(16, 64),
        outcome="error",
        error="RuntimeError: out of memory",
    )
    assert record == {
        "nodeid": "spectral::cross::layer02::head01-v",
        "stack": "cross",
        "layer": 2,
        "scope": "head",
        "head": 1,
        "matrix": "v",
        "kv_head": 1,
        "shape": [16, 64],
        "status": "no_result",
        "outcome": "error",
        "nonfinite_count": None,
        "method": None,
        "floor_limited": False,
        "singular_values": [],
        "metrics": {},
        "broken_rules": [],
        "error": "RuntimeError: out of memory",
    }
    whole = unrecorded_record(
        nodeid="spectral::layer00::down", layer=0, head=None, matrix="down", kv_head=None,
        shape=(64, 128), outcome="skipped", error=None,
    )  # fmt: skip
    assert (whole["scope"], whole["stack"], whole["error"]) == ("matrix", None, None)


def test_head_record(rules) -> None:
    values = spectrum()
    verdict = judge(rules.rules, 1, 3, "k", values, baseline={"spectral_norm": 1.0})
    record = item_record(
        nodeid="spectral::layer01::head03-k",
        layer=1,
        head=3,
        matrix="k",
        kv_head=1,
        shape=(16, 64),
        spectrum=values,
        verdict=verdict,
    )
    assert record == {
        "nodeid": "spectral::layer01::head03-k",
        "stack": None,  # a model of one stack
        "layer": 1,
        "scope": "head",
        "head": 3,
        "matrix": "k",
        "kv_head": 1,
        "shape": [16, 64],
        "status": "ok",
        "outcome": "failed",
        "nonfinite_count": 0,
        "method": "svd",
        "floor_limited": True,
        "singular_values": [2.0, 0.5],
        "metrics": {"first_last_ratio": 400.0, "spectral_norm": 2.0, "alpha": "nan"},
        "broken_rules": [
            {
                "rule": "ill",
                "metric": "first_last_ratio",
                "value": 400.0,
                "min": None,
                "max": 100.0,
                "min_change": None,
                "max_change": None,
                "baseline": None,
                "severity": "fail",
                "bound": "max",  # 400 > 100
                "suggest": "remove_head",  # the rule's own
                "window": None,  # not a trend rule
                "reference_step": None,
            },
            {
                "rule": "drift",
                "metric": "spectral_norm",
                "value": 2.0,
                "min": None,
                "max": None,
                "min_change": -0.1,
                "max_change": 0.1,
                "baseline": 1.0,
                "severity": "warn",
                "bound": "max_change",  # (2 - 1) / 1 = +100% > +10%
                "suggest": "none",  # a drift is a regression, never a pruning candidate
                "window": None,  # against a baseline, not over a window
                "reference_step": None,
            },
        ],
        "error": None,
    }
    json.dumps(record, allow_nan=False)  # nothing JSON cannot carry


def test_whole_matrix_record_with_non_finite_weights(rules) -> None:
    values = spectrum(
        singular_values=[math.nan, math.nan],
        metrics={"first_last_ratio": math.nan, "spectral_norm": math.nan},
        nonfinite=2,
        floor_limited=False,
    )
    verdict = judge(rules.rules, 0, None, "up", values)
    record = item_record(
        nodeid="spectral::layer00::up",
        layer=0,
        head=None,
        matrix="up",
        kv_head=None,
        shape=(96, 64),
        spectrum=values,
        verdict=verdict,
    )
    assert (record["scope"], record["head"], record["kv_head"]) == ("matrix", None, None)
    assert (record["status"], record["outcome"], record["nonfinite_count"]) == (
        "nonfinite",
        "failed",
        2,
    )
    assert record["singular_values"] == ["nan", "nan"]
    assert record["metrics"] == {"first_last_ratio": "nan", "spectral_norm": "nan"}
    assert record["broken_rules"] == []  # head rules do not judge whole matrices


def test_report_document(tiny_checkpoint, rules, tmp_path) -> None:
    checkpoint = open_checkpoint(tiny_checkpoint)
    outcomes = {"b": "failed", "a": "passed", "d": "warned", "c": "passed", "g": "error"}
    outcomes |= {"f": "skipped", "e": "not_run", "h": "failed"}
    records = [{"nodeid": f"spectral::{n}", "outcome": o} for n, o in outcomes.items()]
    report = build_report(
        checkpoint=checkpoint,
        model_argument="org/model",
        rules=rules,
        settings={"precision": "float64"},
        records=records,
        candidates=[{"nodeids": ["spectral::b"]}],
        regressions=[{"nodeids": ["spectral::h"]}, {"nodeids": ["spectral::d"]}],
        params_saved=1234,
    )
    assert report["schema"] == "pytest-spectral-report"
    assert report["schema_version"] == 4
    assert report["plugin_version"] == __version__
    assert report["python"] == platform.python_version()
    created = datetime.fromisoformat(report["created"])
    assert created.utcoffset() == timedelta(0)  # UTC, to the second
    assert created.microsecond == 0
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=5)
    assert report["model"] == {
        "argument": "org/model",
        "source": "local",  # not a hub id here: build_report was not told from_hub
        "path": str(tiny_checkpoint),
        "model_type": "llama",
        "num_hidden_layers": 2,
        "stacks": None,  # a model of one stack
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_size": 64,
        "dtype": "BF16",
        "files": ["model.safetensors"],
    }
    assert report["rules"] == {"path": str(rules.path), "sha256": rules.sha256, "count": 2}
    assert report["settings"] == {"precision": "float64"}
    assert report["summary"] == {
        "items": 8,
        "passed": 2,
        "failed": 2,
        "warned": 1,
        "error": 1,
        "skipped": 1,
        "not_run": 1,
        "regressions": 2,
        "candidates": 1,
        "params_saved": 1234,
    }
    assert [r["nodeid"] for r in report["items"]] == [f"spectral::{n}" for n in "abcdefgh"]
    assert report["regressions"] == [{"nodeids": ["spectral::h"]}, {"nodeids": ["spectral::d"]}]
    assert report["candidates"] == [{"nodeids": ["spectral::b"]}]
    assert list(report)[-2:] == ["regressions", "candidates"]
    path = tmp_path / "out" / "report.json"
    path.parent.mkdir()
    write_report(path, report)
    text = path.read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == report
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary left


def test_report_without_rules_file(tiny_checkpoint) -> None:
    report = build_report(
        checkpoint=open_checkpoint(tiny_checkpoint),
        model_argument="m",
        rules=RuleSet.empty(),
        settings={},
        records=[],
        candidates=[],
        regressions=[],
        params_saved=0,
    )
    assert report["rules"] == {"path": None, "sha256": None, "count": 0}
    assert report["summary"] == {
        "items": 0,
        **dict.fromkeys(["passed", "failed", "warned", "error", "skipped", "not_run"], 0),
        "regressions": 0,
        "candidates": 0,
        "params_saved": 0,
    }
    assert (report["regressions"], report["candidates"]) == ([], [])


def test_a_raw_nan_is_never_written(tmp_path) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        write_report(tmp_path / "r.json", {"value": math.nan})
    assert not (tmp_path / "r.json").exists()


def test_atomic_write_replaces_the_whole_file(tmp_path) -> None:
    path = tmp_path / "report.json"
    write_text_atomically(path, "first, and longer\n")
    write_text_atomically(path, "second\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_missing_directory_is_never_created(tmp_path) -> None:
    """Report paths are checked at startup (a missing directory is a usage error there); the
    writer itself creates no directory either, so a typo never scatters directories."""
    path = tmp_path / "two" / "levels" / "report.json"
    with pytest.raises(FileNotFoundError):
        write_text_atomically(path, "text\n")
    assert list(tmp_path.iterdir()) == []
