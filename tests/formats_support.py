"""Shared by the format tests: running a checkpoint end to end and checking every item's
singular values against numpy's float64 SVD of the weights the format holds."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

RELATIVE = 1e-9
EPS64 = float(np.finfo(np.float64).eps)
#: (layer, matrix) -> the weight in nn.Linear orientation (out x in), float64
Weights = Mapping[tuple[int, str], np.ndarray]


def run_report(
    pytester: pytest.Pytester, *args: str, items: int | None = None, subprocess: bool = False
) -> dict:
    """Run pytest with ``args`` and a JSON report; every item must pass. ``subprocess`` runs
    it in a process of its own (for environment variables read at import, as the hub's)."""
    run = pytester.runpytest_subprocess if subprocess else pytester.runpytest
    result = run(*args, "--spectral-report=report.json", "-p", "no:randomly")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.OK, output
    if items is not None:
        result.assert_outcomes(passed=items)
    return json.loads((pytester.path / "report.json").read_text())


def head_slice(weight: np.ndarray, item: Mapping[str, object], head_dim: int) -> np.ndarray:
    """The rows (Q, K, V) or columns (O) of a head, as transformers splits heads."""
    matrix, head = item["matrix"], item["head"]
    if item.get("scope") == "matrix" or head is None:
        return weight
    index = item["kv_head"] if matrix in ("k", "v") else head
    if matrix == "o":
        return weight[:, index * head_dim : (index + 1) * head_dim]
    return weight[index * head_dim : (index + 1) * head_dim]


def assert_matches_numpy(report: Mapping[str, object], weights: Weights) -> int:
    """Every item's singular values within 1e-9 relative of numpy's float64 SVD (values below
    σ₁·max(m, n)·ε₆₄, rounding noise in any method, absolutely). Returns the items checked."""
    head_dim = report["model"]["head_dim"]
    checked = 0
    for item in report["items"]:
        reference_matrix = head_slice(weights[(item["layer"], item["matrix"])], item, head_dim)
        reference = np.linalg.svd(reference_matrix, compute_uv=False)
        values = np.asarray(item["singular_values"], dtype=np.float64)
        assert values.shape == reference.shape, item["nodeid"]
        floor = reference[0] * max(reference_matrix.shape) * EPS64
        error = np.abs(values - reference)
        assert np.all(error <= RELATIVE * reference + floor), (
            item["nodeid"],
            float(np.max(error / np.maximum(reference, floor))),
        )
        checked += 1
    return checked


def by_layer_and_matrix(
    tensors: Mapping[str, np.ndarray], name_of: Callable[[int, str], str], layers: int
) -> dict[tuple[int, str], np.ndarray]:
    """``(layer, matrix) -> weight`` for q, k, v, o and the gated MLP's matrices present."""
    found = {}
    for layer in range(layers):
        for matrix in ("q", "k", "v", "o", "gate", "up", "down"):
            name = name_of(layer, matrix)
            if name in tensors:
                found[(layer, matrix)] = np.asarray(tensors[name], dtype=np.float64)
    return found


def hf_name(layer: int, matrix: str) -> str:
    """transformers' Llama names (the names under which tests build their weights)."""
    module = "mlp" if matrix in ("gate", "up", "down") else "self_attn"
    return f"model.layers.{layer}.{module}.{matrix}_proj.weight"


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document))
    return path
