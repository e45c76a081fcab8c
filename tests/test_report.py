"""The JSON report's records and document, field by field (README, JSON report)."""

from __future__ import annotations

import json
import math
import platform
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from pytest_spectral import __version__
from pytest_spectral.checkpoints.checkpoint import Checkpoint, open_checkpoint
from pytest_spectral.judging.baseline import Baseline
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
from pytest_spectral.reporting.step import Step
from pytest_spectral.results import HeadSpectrum
from pytest_spectral.testing.synthetic import write_checkpoint

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
    return HeadSpectrum(**{**fields, **changes})


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


def test_finite_values_are_written_as_numbers() -> None:
    values = spectrum(metrics={"first_last_ratio": 4.0, "spectral_norm": 2.0}, floor_limited=False)
    record = item_record(
        nodeid="spectral::layer00::head00-q", layer=0, head=0, matrix="q", kv_head=None,
        shape=(16, 64), spectrum=values, verdict=judge([], 0, 0, "q", values),
    )  # fmt: skip
    assert record["metrics"] == {"first_last_ratio": 4.0, "spectral_norm": 2.0}
    assert record["singular_values"] == [2.0, 0.5]
    assert (record["status"], record["outcome"], record["broken_rules"]) == ("ok", "passed", [])


def report_of(checkpoint: Checkpoint, **given: object) -> dict[str, object]:
    """The report of a run with nothing to report but what ``given`` says."""
    arguments: dict[str, object] = {
        "model_argument": "m", "rules": RuleSet.empty(), "settings": {}, "records": [],
        "candidates": [], "regressions": [], "params_saved": 0,
    }  # fmt: skip
    return build_report(checkpoint=checkpoint, **{**arguments, **given})


def test_a_hub_model_its_step_and_the_baseline_it_was_compared_with(tiny_checkpoint, tmp_path):
    """The model's source, the step, and the baseline: its resolved path, its hash and the
    metrics it lacked (computed from its singular values)."""
    (tmp_path / "runs").mkdir()
    baseline = Baseline(
        tmp_path / "runs" / ".." / "base.json", {}, "ab" * 32, ("top_k_ratio(k=5)",)
    )
    report = report_of(
        open_checkpoint(tiny_checkpoint),
        model_argument="org/model",
        from_hub=True,
        baseline=baseline,
        step=Step("1500", 1500, "directory name"),
    )
    assert report["model"]["argument"] == "org/model"
    assert report["model"]["source"] == "hub"
    assert report["step"] == {"label": "1500", "number": 1500, "source": "directory name"}
    assert report["baseline"] == {
        "path": str((tmp_path / "base.json").resolve()),
        "sha256": "ab" * 32,
        "computed": ["top_k_ratio(k=5)"],
    }


def square_weights(prefix: str, rows: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Random ``rows x rows`` tensors named ``prefix.NAME.weight``."""
    generator = torch.Generator().manual_seed(0)
    return {f"{prefix}.{n}.weight": torch.randn(rows, rows, generator=generator) for n in names}


def test_an_encoder_decoder_models_stacks(tmp_path) -> None:
    """BART of one encoder and two decoder layers (each with its cross-attention), two heads
    of 8 over 16: three stacks, their layers counted together."""
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    tensors = square_weights("model.encoder.layers.0.self_attn", 16, names)
    for layer in (0, 1):
        for module in ("self_attn", "encoder_attn"):
            tensors |= square_weights(f"model.decoder.layers.{layer}.{module}", 16, names)
    for block, layer in (("encoder", 0), ("decoder", 0), ("decoder", 1)):
        tensors |= square_weights(f"model.{block}.layers.{layer}", 16, ("fc1", "fc2"))
    config = {
        "model_type": "bart", "d_model": 16, "encoder_layers": 1, "decoder_layers": 2,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2,
    }  # fmt: skip
    directory = write_checkpoint(tmp_path / "bart", tensors, config, dtype=torch.float32)
    model = report_of(open_checkpoint(directory))["model"]
    assert model["stacks"] == {"encoder": 1, "decoder": 2, "cross": 2}
    assert model["num_hidden_layers"] == 5
    assert "stack_geometry" not in model  # no stack's own heads


def test_a_vision_towers_own_head_geometry(tmp_path) -> None:
    """LLaVA: a Llama text model (one layer, two heads of 8 over 16 sharing one K/V head)
    beside a CLIP tower (two layers, two heads of 4 over 8), analysed with the tower: the
    ``model`` keys stay the text model's, ``stack_geometry`` gives the tower's."""
    text = square_weights("model.language_model.layers.0.self_attn", 16, ("q_proj", "o_proj"))
    text |= {
        f"model.language_model.layers.0.self_attn.{n}.weight": torch.randn(8, 16)
        for n in ("k_proj", "v_proj")
    }
    text |= square_weights(
        "model.language_model.layers.0.mlp", 16, ("gate_proj", "up_proj", "down_proj")
    )
    tower = {}
    for layer in (0, 1):
        prefix = f"model.vision_tower.vision_model.encoder.layers.{layer}"
        tower |= square_weights(
            f"{prefix}.self_attn", 8, ("q_proj", "k_proj", "v_proj", "out_proj")
        )
        tower |= square_weights(f"{prefix}.mlp", 8, ("fc1", "fc2"))
    config = {
        "model_type": "llava",
        "text_config": {
            "model_type": "llama", "hidden_size": 16, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 1, "intermediate_size": 16,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 8, "num_attention_heads": 2,
            "num_hidden_layers": 2, "intermediate_size": 8,
        },
    }  # fmt: skip
    directory = write_checkpoint(tmp_path / "llava", text | tower, config, dtype=torch.float32)
    model = report_of(open_checkpoint(directory, vision=True))["model"]
    assert model["stacks"] == {"vision": 2}
    text_keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    assert [model[k] for k in (*text_keys, "hidden_size")] == [1, 2, 1, 8, 16]
    assert model["stack_geometry"] == {
        "vision": {
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 4,
            "hidden_size": 8,
        }
    }


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
    assert (report["step"], report["baseline"]) == (None, None)  # none given
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
    # one key a line, one space a level; the schema mark first (an earlier report at the path
    # is recognised by it)
    assert text.startswith('{\n "schema": "pytest-spectral-report",\n "schema_version": 4,\n')
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
