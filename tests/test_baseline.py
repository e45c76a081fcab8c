"""Reading a baseline report: what is matched, and which reports are refused."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.judging.baseline import BaselineError, load_baseline

#: the tiny_checkpoint fixture's layout (conftest.py)
MODEL = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_size": 64,
}


def report(**changes: object) -> dict:
    items = [
        {
            "nodeid": "spectral::layer00::head00-q",
            "metrics": {"spectral_norm": 1.5, "alpha": "nan"},
        },
        {"nodeid": "spectral::layer01::k", "metrics": {"first_last_ratio": "inf", "rank": 3}},
    ]
    document = {
        "schema": "pytest-spectral-report",
        "schema_version": 1,
        "model": dict(MODEL),
        "items": items,
    }
    document.update(changes)
    return document


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def checkpoint(tiny_checkpoint):
    return open_checkpoint(tiny_checkpoint)


def test_metrics_by_node_id(tmp_path, checkpoint) -> None:
    path = write(tmp_path, report())
    baseline = load_baseline(path, checkpoint)
    assert baseline.path == path
    head = baseline.for_item("spectral::layer00::head00-q")
    assert head["spectral_norm"] == 1.5
    assert math.isnan(head["alpha"])  # "nan" as the report writes it
    assert baseline.for_item("spectral::layer01::k") == {"first_last_ratio": math.inf, "rank": 3.0}
    assert baseline.for_item("spectral::layer01::head00-q") is None


@pytest.mark.parametrize(("field", "other"), [(f, "x" if f == "model_type" else 7) for f in MODEL])
def test_another_layout_is_refused_naming_the_field(tmp_path, checkpoint, field, other) -> None:
    path = write(tmp_path, report(model={**MODEL, field: other}))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint)
    message = str(info.value)
    assert message.startswith(
        f"{path}: baseline is for a different model layout: model.{field} is "
    )
    assert f"{other!r} there and {MODEL[field]!r} here" in message


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "not a pytest-spectral report"),
        ({"schema": "something-else"}, "not a pytest-spectral report"),
        (
            report(schema_version=5),
            "report schema version 5; this plugin reads versions 1, 2, 3, 4",
        ),
        (report(schema_version=True), "report schema version True; this plugin reads"),
        (report(items=[{"nodeid": "x"}]), r"items\[0\]\.metrics must be an object, got NoneType"),
        (
            report(items=[{"nodeid": "x", "metrics": {"a": "high"}}]),
            re.escape(
                'items[0].metrics.a must be a number (or "nan", "inf", "-inf"), got str \'high\''
            ),
        ),
        (report(items=None), "key 'items' must be a list, got NoneType None"),
    ],
)
def test_what_is_not_a_usable_report(tmp_path, checkpoint, document, message) -> None:
    path = write(tmp_path, document)
    with pytest.raises(BaselineError, match=message) as info:
        load_baseline(path, checkpoint)
    assert str(info.value).startswith(str(path))


def test_unreadable_and_non_json_files(tmp_path, checkpoint) -> None:
    with pytest.raises(BaselineError, match=r"absent\.json: no such file or directory"):
        load_baseline(tmp_path / "absent.json", checkpoint)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff\xfe not json")
    with pytest.raises(BaselineError, match=r"garbage\.json: baseline report is not valid JSON"):
        load_baseline(garbage, checkpoint)


def test_messages_in_full(tmp_path, checkpoint) -> None:
    absent = tmp_path / "absent.json"
    with pytest.raises(BaselineError) as info:
        load_baseline(absent, checkpoint)
    assert str(info.value) == f"{absent}: no such file or directory"
    path = write(tmp_path, report(items=[{"nodeid": "x"}]))
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint)
    assert str(info.value) == f"{path}: items[0].metrics must be an object, got NoneType None"


def test_a_report_without_model_is_refused(tmp_path, checkpoint) -> None:
    document = report()
    del document["model"]
    path = write(tmp_path, document)
    with pytest.raises(BaselineError) as info:
        load_baseline(path, checkpoint)
    assert str(info.value) == f"{path}: key 'model' must be an object, got NoneType None"
