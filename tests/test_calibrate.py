"""Calibration: each bound is the observed range widened by margin x (p95 - p5), by hand.

numpy's default (linear) percentiles of 1, 2, 3, 4, 5 are p5 = 1.2 and p95 = 4.8, a spread of
3.6; with margin 0.25 the bounds are 1 - 0.9 = 0.1 and 5 + 0.9 = 5.9. Log-scale metrics do the
same on log10 of the values: 1, 10, 100 give 0, 1, 2, spread 1.8, bounds 10^-0.45 and 10^2.45.
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest

from pytest_spectral.judging.calibrate import CALIBRATED, calibrated_rules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def record(
    matrix: str, status: str = "ok", scope: str = "head", outcome: str = "passed", **metrics: float
) -> dict:
    """An item of a one-layer, one-head model (so that every rule covers the whole model)."""
    return {
        "layer": 0,
        "head": 0 if scope == "head" else None,
        "matrix": matrix,
        "status": status,
        "scope": scope,
        "outcome": outcome,
        "metrics": metrics,
    }


def rules_text(records: list[dict], *, margin: float, source: str = "m") -> str:
    return calibrated_rules(records, margin=margin, source=source, layers=1, heads=1).text


def bounds(text: str) -> dict[str, tuple[float, float, list[str], str]]:
    return {
        r["name"]: (r["min"], r["max"], r["matrices"], r["scope"])
        for r in tomllib.loads(text)["rules"]
    }


def test_linear_metric_by_hand() -> None:
    records = [record("q", effective_rank=v) for v in (3.0, 1.0, 5.0, 2.0, 4.0)]
    rules = bounds(rules_text(records, margin=0.25, source="model"))
    low, high, matrices, scope = rules["calibrated-q-effective_rank"]
    assert low == pytest.approx(0.1, rel=1e-12)
    assert high == pytest.approx(5.9, rel=1e-12)
    assert (matrices, scope) == (["q"], "head")
    assert list(rules) == ["calibrated-q-effective_rank"]


@pytest.mark.parametrize("metric", ["spectral_norm", "frobenius_norm", "first_last_ratio"])
def test_log_metric_by_hand(metric: str) -> None:
    records = [record("k", **{metric: v}) for v in (10.0, 1.0, 100.0)]
    low, high, _, _ = bounds(rules_text(records, margin=0.25, source="m"))[f"calibrated-k-{metric}"]
    assert low == pytest.approx(10**-0.45, rel=1e-12)
    assert high == pytest.approx(10**2.45, rel=1e-12)


def test_log_metric_with_a_zero_falls_back_to_linear() -> None:
    records = [record("o", spectral_norm=v) for v in (0.0, 1.0, 2.0, 3.0, 4.0)]
    low, high, _, _ = bounds(rules_text(records, margin=0.25, source="m"))[
        "calibrated-o-spectral_norm"
    ]
    assert (low, high) == pytest.approx((0.0 - 0.9, 4.0 + 0.9), rel=1e-12)


def test_margin_scales_the_widening() -> None:
    records = [record("q", stable_rank=v) for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
    for margin, (low, high) in ((0.0, (1.0, 5.0)), (1.0, (1 - 3.6, 5 + 3.6))):
        rules = bounds(rules_text(records, margin=margin, source="m"))
        assert rules["calibrated-q-stable_rank"][:2] == pytest.approx((low, high), rel=1e-12)


def test_unhealthy_items_and_undefined_values_are_left_out() -> None:
    """Items with non-finite or zero weights, and items that failed or warned in the
    calibration run (the user's own rules found them bad), never widen the bounds."""
    records = [
        *(record("q", top_k_ratio=v) for v in (0.2, 0.4)),
        record("q", status="nonfinite", outcome="failed", top_k_ratio=0.99),
        record("q", status="zero_matrix", outcome="failed", top_k_ratio=0.0),
        record("q", outcome="failed", top_k_ratio=0.9),
        record("q", outcome="warned", top_k_ratio=0.05),
        record("q", top_k_ratio=math.nan),
        record("q", top_k_ratio=math.inf),
        record("q", top_k_ratio="nan"),  # as read back from a JSON report
    ]
    calibration = calibrated_rules(records, margin=0.0, source="m", layers=1, heads=1)
    assert (calibration.used, calibration.left_out) == (5, 4)
    text = calibration.text
    assert bounds(text)["calibrated-q-top_k_ratio"][:2] == (0.2, 0.4)
    # passed with ok status, whatever their values
    assert "from the 5 items that passed (4 that failed or warned were left out)." in text
    assert "# q heads (n=2): observed 0.2 .. 0.4" in text


def test_one_rule_per_matrix_type_and_scope_in_a_fixed_order() -> None:
    records = [
        record(matrix, scope=scope, energy_rank=value)
        for matrix in ("up", "o", "q", "gate", "k")
        for scope in ("matrix", "head")
        for value in (1.0, 2.0)
        if scope == "matrix" or matrix in "qko"
    ]
    names = list(bounds(rules_text(records, margin=0.25, source="m")))
    assert names == [
        "calibrated-q-energy_rank",
        "calibrated-k-energy_rank",
        "calibrated-o-energy_rank",
        "calibrated-q-energy_rank-whole",
        "calibrated-k-energy_rank-whole",
        "calibrated-o-energy_rank-whole",
        "calibrated-gate-energy_rank-whole",
        "calibrated-up-energy_rank-whole",
    ]
    rules = bounds(rules_text(records, margin=0.25, source="m"))
    assert rules["calibrated-up-energy_rank-whole"][2:] == (["up"], "matrix")


def test_every_calibrated_metric_gets_a_rule_and_the_header_says_how() -> None:
    records = [record("v", **{metric: v for metric, _ in CALIBRATED}) for v in (1.0, 2.0, 4.0)]
    text = rules_text(records, margin=0.5, source="ckpt-10000")
    names = list(bounds(text))
    assert names == [f"calibrated-v-{metric}" for metric, _ in CALIBRATED]
    header = text.splitlines()[:6]
    assert header[0] == "# Calibrated by pytest-spectral on ckpt-10000"
    # the time in UTC, to the second
    assert re.fullmatch(
        r"# at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00, from the 3 items that passed\.", header[1]
    )
    assert header[2:] == [
        "# Each bound is the observed range widened on both sides by",
        "# margin x (95th - 5th percentile), margin = 0.5; log-scale metrics are",
        "# widened by that factor of their log10 spread. Values of those items all lie",
        "# inside, so testing the checkpoint with this file passes them.",
    ]


def test_bounds_never_exclude_an_observed_value() -> None:
    """Round-tripping through the TOML text keeps every calibration value inside."""
    values = [0.1 + i / 7 for i in range(9)]
    records = [record("q", least_k_ratio=v, spectral_norm=v * 1e3) for v in values]
    rules = bounds(rules_text(records, margin=0.0, source="m"))
    for name, scale in (("least_k_ratio", 1.0), ("spectral_norm", 1e3)):
        low, high, _, _ = rules[f"calibrated-q-{name}"]
        assert low <= min(values) * scale
        assert high >= max(values) * scale


def test_huge_log_scale_spread_gives_infinite_bounds() -> None:
    """Norms spanning 1e-300 to 1e300 (float64 weights): 10^(upper) is no float, so inf."""
    records = [record("q", spectral_norm=v) for v in (1e-300, 1.0, 1e300)]
    with np.errstate(all="raise"):
        text = rules_text(records, margin=0.25, source="m")
    low, high, _, _ = bounds(text)["calibrated-q-spectral_norm"]
    assert (low, high) == (0.0, math.inf)


def test_records_without_a_scope_are_head_items() -> None:
    records = [
        {
            "layer": 0,
            "head": 0,
            "matrix": "q",
            "status": "ok",
            "outcome": "passed",
            "metrics": {"stable_rank": v},
        }
        for v in (1.0, 2.0)
    ]
    rules = bounds(rules_text(records, margin=0.0, source="m"))
    assert rules == {"calibrated-q-stable_rank": (1.0, 2.0, ["q"], "head")}


def test_each_rule_says_how_its_bounds_were_derived() -> None:
    records = [record("q", effective_rank=v, spectral_norm=10**v) for v in (1.0, 2.0, 3.0)]
    records += [record("up", scope="matrix", effective_rank=v) for v in (4.0, 6.0)]
    text = rules_text(records, margin=0.25, source="m")
    # linear 1, 2, 3: p5 1.1, p95 2.9; log10 of 10, 100, 1000 alike; 4, 6: p5 4.1, p95 5.9
    assert "# q heads (n=3): observed 1 .. 3, p5-p95 spread 1.8\n" in text
    assert "# q heads (n=3): observed 10 .. 1000, log10 p5-p95 spread 1.8\n" in text
    assert "# up whole matrices (n=2): observed 4 .. 6, p5-p95 spread 1.8\n" in text


def test_overflowing_bounds_are_written_as_toml_infinities() -> None:
    """Hostile values: the widening overflows to -inf / inf, which TOML can carry; numpy's
    floating-point errors are handled even where the caller makes them raise."""
    records = [record("q", top_k_ratio=v) for v in (-1e308, 0.0, 1e308)]
    with np.errstate(all="raise"):
        text = rules_text(records, margin=0.25, source="m")
    assert "min = -inf\nmax = inf\n" in text
    rules = bounds(text)
    assert rules["calibrated-q-top_k_ratio"][:2] == (-math.inf, math.inf)


def item(
    matrix: str, layer: int, head: int | None, *, stack: str | None = None, **fields: object
) -> dict:
    """An item of any layer and head (``head`` None: a whole matrix), stable_rank 1."""
    return {
        "layer": layer,
        "head": head,
        "matrix": matrix,
        "stack": stack,
        "status": "ok",
        "scope": "head" if head is not None else "matrix",
        "outcome": "passed",
        "metrics": {"stable_rank": 1.0},
        **fields,
    }


def selections(text: str) -> dict[str, dict[str, object]]:
    """Each rule's name -> what it selects besides its matrix and scope."""
    keys = ("stacks", "layers", "heads")
    return {r["name"]: {k: r[k] for k in keys if k in r} for r in tomllib.loads(text)["rules"]}


def test_a_run_of_part_of_the_model_restricts_each_rule_to_the_items_it_measured() -> None:
    """Layers 0 and 2 of 4, query heads 0-1 of 8 (``--spectral-layers``, ``-k``): each rule
    selects the layers and heads its own items came from, whatever their outcome (Q's only
    item of layer 2 failed); items of an older report, without ``scope``, are head items."""
    q = [item("q", 0, 0), item("q", 0, 1), item("q", 2, 0)]
    q[2]["outcome"] = "failed"
    k = [item("k", layer, head) for layer in (0, 2) for head in (0, 1)]
    for record in k:
        del record["scope"]
    whole = [item("q", layer, None) for layer in (0, 2)]
    calibration = calibrated_rules(q + k + whole, margin=0.0, source="m", layers=4, heads=8)
    assert calibration.part == "layers 0,2 of 0-3 and query heads 0-1 of 0-7"
    assert (calibration.used, calibration.left_out) == (8, 1)
    header = calibration.text.splitlines()[1:8]
    assert header[0].endswith(
        ", from the 8 items that passed (1 that failed or warned was left out)."
    )
    assert header[5:] == [
        "# The run measured only layers 0,2 of 0-3 and query heads 0-1 of 0-7: each rule is "
        "restricted to the layers and",
        "# heads its items came from (layers = ..., heads = ...).",
    ]
    assert selections(calibration.text) == {
        "calibrated-q-stable_rank": {"layers": "0,2", "heads": "0-1"},
        "calibrated-k-stable_rank": {"layers": "0,2", "heads": "0-1"},
        "calibrated-q-stable_rank-whole": {"layers": "0,2"},
    }


def test_a_rule_whose_items_cover_the_model_selects_no_layers_or_heads() -> None:
    records = [item("q", layer, head) for layer in (0, 1) for head in (0, 1)]
    records += [item("k", 1, head) for head in (0, 1)] + [item("v", layer, 1) for layer in (0, 1)]
    calibration = calibrated_rules(records, margin=0.0, source="m", layers=2, heads=2)
    assert calibration.part is None
    assert "# The run measured only" not in calibration.text
    assert selections(calibration.text) == {
        "calibrated-q-stable_rank": {},
        "calibrated-k-stable_rank": {"layers": "1"},
        "calibrated-v-stable_rank": {"heads": "1"},
    }


def test_each_stack_gets_rules_of_its_own_with_its_own_head_count() -> None:
    """A wrapper's text model (2 layers, 2 heads; the layers in no stack, which rules call
    ``text``) beside its vision tower (2 layers, 4 heads): the text run measured layer 0,
    the tower's heads 0-1."""
    text = [item("q", 0, head) for head in (0, 1)]
    tower = [item("q", layer, head, stack="vision") for layer in (0, 1) for head in (0, 1)]
    calibration = calibrated_rules(
        text + tower,
        margin=0.0,
        source="m",
        layers={None: 2, "vision": 2},
        heads={None: 2, "vision": 4},
    )
    assert calibration.part == ("layers 0 of 0-1; the vision stack's query heads 0-1 of 0-3")
    assert selections(calibration.text) == {
        "calibrated-text-q-stable_rank": {"stacks": ["text"], "layers": "0"},
        "calibrated-vision-q-stable_rank": {"stacks": ["vision"], "heads": "0-1"},
    }
    assert "# text-q heads (n=2): observed 1 .. 1, p5-p95 spread 0\n" in calibration.text
    assert "# vision-q heads (n=4): observed 1 .. 1, p5-p95 spread 0\n" in calibration.text


def test_an_encoder_decoder_models_stacks_share_the_head_count() -> None:
    records = [
        item("q", layer, head, stack=stack)
        for stack in ("encoder", "decoder")
        for layer in (0, 1)
        for head in (0, 1)
    ]
    calibration = calibrated_rules(
        records, margin=0.0, source="m", layers={"encoder": 2, "decoder": 2}, heads=2
    )
    assert calibration.part is None
    assert selections(calibration.text) == {
        "calibrated-encoder-q-stable_rank": {"stacks": ["encoder"]},
        "calibrated-decoder-q-stable_rank": {"stacks": ["decoder"]},
    }
