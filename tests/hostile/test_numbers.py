"""Numeric extremes and failing tensors: only what is really wrong is reported, where it is.

A gate must not fail a checkpoint for the limits of a floating-point format (weights of 1e-170
whose Gram matrix underflows, float64 weights beyond float32's range), nor blame the wrong
tensor or every item of a layer when one tensor cannot be served.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.checkpoints.reader import WeightReader
from pytest_spectral.compute import spectra
from pytest_spectral.compute.engine import SpectraEngine, UnitError
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=48)
SCALE_FREE = ("top_k_ratio", "effective_rank", "stable_rank", "spectral_entropy", "energy_rank")


def report_items(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest(*args, "--spectral-report=r.json")
    items = json.loads((pytester.path / "r.json").read_text())["items"]
    return result, {item["nodeid"]: item for item in items}


def float64_checkpoint(directory: Path, scale: float) -> Path:
    tensors = {name: t.double() * scale for name, t in random_llama_weights(SHAPE).items()}
    return write_checkpoint(directory, tensors, SHAPE.config("float64"), dtype=torch.float64)


def numpy_slice(directory: Path, layer: int, matrix: str, head: int) -> np.ndarray:
    """A head's slice as stored, read by safetensors' numpy loader."""
    from safetensors.numpy import load_file

    weight = load_file(str(directory / "model.safetensors"))[attention_name(layer, matrix)]
    d = SHAPE.head_dim
    rows = slice(head * d, (head + 1) * d)
    return weight[:, rows] if matrix == "o" else weight[rows]


def numpy_values(directory: Path, layer: int, matrix: str, head: int) -> np.ndarray:
    """numpy's float64 LAPACK singular values of a head's slice as stored."""
    block = numpy_slice(directory, layer, matrix, head).astype(np.float64)
    return np.linalg.svd(block, compute_uv=False)


@pytest.mark.parametrize(
    ("scale", "options"),
    [
        (1e-170, ()),  # every Gram entry underflows to zero
        (1e-300, ()),
        (1e160, ()),  # every Gram entry overflows
        (1e39, ("--spectral-dtype=float32",)),  # beyond float32's range
    ],
)
def test_extreme_but_finite_weights_are_measured(pytester, scale, options) -> None:
    directory = float64_checkpoint(pytester.path / "extreme", scale)
    result, items = report_items(pytester, f"--spectral-model={directory}", *options)
    result.assert_outcomes(passed=32)
    assert {item["status"] for item in items.values()} == {"ok"}
    record = items["spectral::layer01::head02-o"]
    reference = numpy_values(directory, 1, "o", 2)
    tolerance = 1e-5 if options else 1e-9
    np.testing.assert_allclose(record["singular_values"], reference, rtol=tolerance)
    # The metrics see the same spectrum at any scale.
    plain = float64_checkpoint(pytester.path / "plain", 1.0)
    _, unscaled = report_items(pytester, f"--spectral-model={plain}", *options)
    for metric in SCALE_FREE:
        assert record["metrics"][metric] == pytest.approx(
            unscaled["spectral::layer01::head02-o"]["metrics"][metric], rel=tolerance
        ), metric
    assert record["metrics"]["spectral_norm"] == pytest.approx(reference[0], rel=tolerance)
    assert record["metrics"]["frobenius_norm"] == pytest.approx(
        float(np.sqrt(np.sum((reference / scale) ** 2))) * scale, rel=tolerance
    )


def test_only_genuinely_zero_or_non_finite_slices_are_reported_so(pytester) -> None:
    tensors = {name: t.double() * 1e-170 for name, t in random_llama_weights(SHAPE).items()}
    tensors[attention_name(0, "q")][8:16] = 0.0  # query head 1: all zero
    tensors[attention_name(1, "k")][3, 7] = float("inf")  # K/V head 0: query heads 0 and 1
    directory = write_checkpoint(
        pytester.path / "ckpt", tensors, SHAPE.config("float64"), dtype=torch.float64
    )
    result, items = report_items(pytester, f"--spectral-model={directory}")
    result.assert_outcomes(passed=29, failed=3)
    bad = {nodeid: item["status"] for nodeid, item in items.items() if item["status"] != "ok"}
    assert bad == {
        "spectral::layer00::head01-q": "zero_matrix",
        "spectral::layer01::head00-k": "nonfinite",
        "spectral::layer01::head01-k": "nonfinite",
    }


def test_a_tensor_that_cannot_be_read_fails_only_its_unit(pytester, monkeypatch) -> None:
    directory = write_checkpoint(
        pytester.path / "ckpt", random_llama_weights(SHAPE), SHAPE.config()
    )
    broken = attention_name(1, "k")
    original = WeightReader.tensor

    def tensor(self, entry):
        if entry.name == broken:
            raise OSError(5, "Input/output error")
        return original(self, entry)

    monkeypatch.setattr(WeightReader, "tensor", tensor)
    result = pytester.runpytest(f"--spectral-model={directory}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=28, failed=4)  # the 4 query heads that share layer 1's K
    failed = [line.split(" - ")[0] for line in result.outlines if line.startswith("FAILED")]
    assert failed == [f"FAILED spectral::layer01::head0{head}-k" for head in range(4)]
    causes = [line for line in result.outlines if line.startswith("cannot read")]
    assert causes == [f"cannot read {broken} from {directory / 'model.safetensors'}: "
                      "[Errno 5] Input/output error"] * 4  # fmt: skip


class TestEngineUnits:
    """The same at the engine's level: each (layer, matrix, scope) stands alone."""

    def test_a_failing_unit_leaves_its_layer_served(self, tmp_path, monkeypatch) -> None:
        directory = write_checkpoint(tmp_path, random_llama_weights(SHAPE), SHAPE.config())
        engine = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS)
        engine.plan([(0, m, "head") for m in ("q", "k", "v", "o")])

        def refuse(batch: torch.Tensor, dtype: torch.dtype) -> None:
            raise RuntimeError("LAPACK said no")

        monkeypatch.setattr(spectra, "_decompose", refuse)
        with pytest.raises(UnitError, match=r"cannot decompose model.layers.0.self_attn.q_proj"):
            engine.head(0, "q", 0)
        with pytest.raises(UnitError, match="RuntimeError: LAPACK said no"):
            engine.head(0, "o", 3)


@pytest.mark.parametrize("power", [-1000, -600, 500])
def test_metrics_of_a_spectrum_scaled_by_a_power_of_two(power: int) -> None:
    """Squares of 1e-170 or 1e150 leave float64's range; the metrics must not notice."""
    from pytest_spectral.judging import metrics

    spectrum = np.logspace(0, -3, 32)[None, :]
    scaled = np.ldexp(spectrum, power)
    context = metrics.MetricContext((32, 512), "F64")

    def measure(name: str, values: np.ndarray) -> np.ndarray:
        spec = metrics.METRICS[name]
        return spec.function(values, **({"context": context} if spec.needs_context else {}))

    for name in (*SCALE_FREE, "participation_ratio", "numerical_rank", "first_last_ratio"):
        assert measure(name, scaled) == measure(name, spectrum), name  # bit for bit
    for name in ("frobenius_norm", "spectral_norm", "nuclear_norm"):
        assert measure(name, scaled) == np.ldexp(measure(name, spectrum), power), name
    floor = metrics.measurement_floor(scaled, context)
    assert floor == np.ldexp(metrics.measurement_floor(spectrum, context), power)


class TestOneHeadScaled:
    """One query head's weights multiplied by an extreme factor, every other head ordinary.

    Expected values come from numpy's float64 SVD of the slice as stored and from the same
    head of an unscaled checkpoint, never from the plugin.
    """

    LAYER, HEAD = 1, 2
    NODE = "spectral::layer01::head02-q"
    #: bounds that every head of the unscaled checkpoint keeps, scale-free and scale-bound
    RULES = """
        [[rules]]
        metric = "spectral_norm"
        max = 100.0
        [[rules]]
        metric = "frobenius_norm"
        min = 1e-3
        max = 100.0
        [[rules]]
        metric = "nuclear_norm"
        max = 1000.0
        [[rules]]
        metric = "stable_rank"
        min = 1.0
        [[rules]]
        metric = "effective_rank"
        min = 1.0
        [[rules]]
        metric = "participation_ratio"
        min = 1.0
        [[rules]]
        metric = "first_last_ratio"
        max = 1e6
    """

    def checkpoint(self, directory: Path, scale: float, dtype: torch.dtype) -> Path:
        tensors = {name: t.double() for name, t in random_llama_weights(SHAPE).items()}
        d = SHAPE.head_dim
        tensors[attention_name(self.LAYER, "q")][self.HEAD * d : (self.HEAD + 1) * d] *= scale
        name = str(dtype).removeprefix("torch.")
        return write_checkpoint(directory, tensors, SHAPE.config(name), dtype=dtype)

    @pytest.mark.parametrize("scale", [1e-170, 1e-160, 1e300])
    def test_extreme_float64_head_is_measured_and_judged_like_any_other(
        self, pytester, scale
    ) -> None:
        directory = self.checkpoint(pytester.path / "scaled", scale, torch.float64)
        plain = self.checkpoint(pytester.path / "plain", 1.0, torch.float64)
        (pytester.path / "rules.toml").write_text(self.RULES)
        _, unscaled = report_items(
            pytester, f"--spectral-model={plain}", "--spectral-thresholds=rules.toml"
        )
        assert {item["outcome"] for item in unscaled.values()} == {"passed"}  # the rules hold

        result, items = report_items(
            pytester, f"--spectral-model={directory}", "--spectral-thresholds=rules.toml"
        )
        record = items[self.NODE]
        assert record["status"] == "ok"  # 1e-170: not a zero matrix; 1e300: not overflowed
        reference = numpy_values(directory, self.LAYER, "q", self.HEAD)
        assert reference[-1] > 0
        assert np.isfinite(reference[0])
        np.testing.assert_allclose(record["singular_values"], reference, rtol=1e-9, atol=0)
        values = record["metrics"]
        same = unscaled[self.NODE]["metrics"]

        def undefined(metrics: dict) -> set[str]:
            return {name for name, value in metrics.items() if not np.isfinite(float(value))}

        # Finite wherever the unscaled head's are (alpha needs more than 8 values, at any scale).
        assert undefined(values) == undefined(same) == {name for name in values if "alpha" in name}
        for metric in (*SCALE_FREE, "participation_ratio", "first_last_ratio"):
            assert values[metric] == pytest.approx(same[metric], rel=1e-9), metric
        assert values["spectral_norm"] == pytest.approx(reference[0], rel=1e-9)
        assert values["frobenius_norm"] == pytest.approx(
            float(np.sqrt(np.sum((reference / scale) ** 2))) * scale, rel=1e-9
        )
        assert values["nuclear_norm"] == pytest.approx(
            float(np.sum(reference / scale)) * scale, rel=1e-9
        )
        # The gate holds: scale-bound rules break (never an overflow or underflow that
        # passes), scale-free ones judge the head as they judge it unscaled.
        broken = sorted(rule["metric"] for rule in record["broken_rules"])
        scale_bound = (
            ["frobenius_norm"] if scale < 1 else ["frobenius_norm", "nuclear_norm", "spectral_norm"]
        )
        assert broken == scale_bound
        assert record["outcome"] == "failed"
        result.assert_outcomes(passed=31, failed=1)
        others = [item for nodeid, item in items.items() if nodeid != self.NODE]
        assert {item["outcome"] for item in others} == {"passed"}

    def test_float32_weights_beyond_range_are_stored_as_inf_and_fail(self, pytester) -> None:
        directory = self.checkpoint(pytester.path / "scaled", 1e39, torch.float32)
        stored = numpy_slice(directory, self.LAYER, "q", self.HEAD)
        overflowed = int(np.isinf(stored).sum())
        assert overflowed > 0  # the weights beyond float32's 3.4e38
        result, items = report_items(pytester, f"--spectral-model={directory}")
        result.assert_outcomes(passed=31, failed=1)
        record = items[self.NODE]
        assert record["status"] == "nonfinite"
        assert record["outcome"] == "failed"
        assert record["nonfinite_count"] == overflowed
        result.stdout.fnmatch_lines([f"FAILED {self.NODE} - {overflowed} non-finite weights"])
        neighbour = items["spectral::layer01::head01-q"]  # same tensor, finite rows
        np.testing.assert_allclose(
            neighbour["singular_values"],
            numpy_values(directory, self.LAYER, "q", 1),
            rtol=1e-9,
        )
