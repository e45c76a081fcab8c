"""Per-head singular values against an independent float64 LAPACK reference (numpy).

The reference slices each head straight from the safetensors file, as the issue defines it:
Q/K/V rows ``[h*d:(h+1)*d]``, O columns ``[:, h*d:(h+1)*d]``, query head h using K/V head
``h // (heads // kv_heads)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pytest_spectral.checkpoints.checkpoint import MATRICES, open_checkpoint
from pytest_spectral.compute import spectra
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.compute.spectra import slice_singular_values
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS
from pytest_spectral.testing.strategies import matrix_from_spectrum
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

RELATIVE_CONTRACT = 1e-9


def reference_slice(directory: Path, layer: int, matrix: str, head: int) -> np.ndarray:
    config = open_checkpoint(directory).geometry
    name = attention_name(layer, matrix)
    files = sorted(directory.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                weight = handle.get_tensor(name).to(torch.float64).numpy()
    d = config.head_dim
    if matrix in ("k", "v"):
        head = head // (config.heads // config.kv_heads)
    return (
        weight[:, head * d : (head + 1) * d] if matrix == "o" else weight[head * d : (head + 1) * d]
    )


def relative_error(values: list[float], reference: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(values) - reference) / reference))


@pytest.mark.parametrize(
    ("dtype", "shards", "heads", "kv_heads"),
    [
        (torch.bfloat16, 1, 4, 2),
        (torch.bfloat16, 3, 4, 4),
        (torch.float16, 2, 6, 2),
        (torch.float32, 1, 4, 1),
    ],
)
def test_every_head_matches_numpy_svd(make_checkpoint, dtype, shards, heads, kv_heads) -> None:
    directory = make_checkpoint(
        layers=2, heads=heads, kv_heads=kv_heads, head_dim=8, hidden=40, dtype=dtype, shards=shards
    )
    engine = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS)
    for layer in range(2):
        for matrix in MATRICES:
            for head in range(heads):
                reference = np.linalg.svd(
                    reference_slice(directory, layer, matrix, head), compute_uv=False
                )
                values = engine.head(layer, matrix, head).singular_values
                assert len(values) == 8
                assert relative_error(values, reference) < RELATIVE_CONTRACT, (layer, matrix, head)


def test_head_dim_different_from_hidden_over_heads(make_checkpoint) -> None:
    directory = make_checkpoint(layers=1, heads=2, kv_heads=1, head_dim=24, hidden=32)
    assert open_checkpoint(directory).geometry.head_dim == 24
    engine = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS)
    reference = np.linalg.svd(reference_slice(directory, 0, "o", 1), compute_uv=False)
    assert relative_error(engine.head(0, "o", 1).singular_values, reference) < RELATIVE_CONTRACT


def test_kv_spectra_are_computed_once_per_kv_head(make_checkpoint, monkeypatch) -> None:
    directory = make_checkpoint(layers=1, heads=8, kv_heads=2, head_dim=8, hidden=64)
    batches: list[tuple[int, ...]] = []
    original = spectra.slice_singular_values

    def spy(blocks: torch.Tensor, **kwargs: object) -> spectra.SliceSpectra:
        batches.append(tuple(blocks.shape))
        return original(blocks, **kwargs)

    monkeypatch.setattr(spectra, "slice_singular_values", spy)
    engine = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS)
    for head in range(8):
        for matrix in MATRICES:
            engine.head(0, matrix, head)
    assert sorted(batches) == sorted([(8, 8, 64), (2, 8, 64), (2, 8, 64), (8, 64, 8)])
    assert engine.head(0, "k", 0) is engine.head(0, "k", 3)
    assert engine.head(0, "k", 3) is not engine.head(0, "k", 4)


def rotated_block(kappa: float, seed: int, rows: int = 32, cols: int = 512) -> np.ndarray:
    """``U diag(s) V^T`` with random orthonormal U, V and s geometric from 1 down to 1/kappa.

    Rotated, not graded: scaling the rows of a random matrix (a graded matrix) leaves Gram +
    eigvalsh accurate to about 1e-13 whatever the condition number, so only a rotated block
    shows the eps * kappa^2 error the SVD fallback exists for (about 1e-5 at kappa 1e6).
    """
    return matrix_from_spectrum(np.geomspace(1.0, 1.0 / kappa, rows), rows, cols, seed)


#: the Gram route is certified for lambda_min / lambda_max >= eps / 1e-10, i.e. kappa <~ 671
GRAM_LIMIT = (1e-10 / np.finfo(np.float64).eps) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kappa", [1e1, 1e2, 6e2, 1e3, 1e4, 1e6])
def test_accuracy_contract_up_to_condition_number_1e6(kappa: float, dtype: torch.dtype) -> None:
    """1e-9 relative to LAPACK float64 on the stored values, whichever route each head took."""
    blocks = torch.stack([torch.from_numpy(rotated_block(kappa, seed)) for seed in range(4)])
    blocks = blocks.to(dtype)
    result = slice_singular_values(blocks)
    for i in range(4):
        reference = np.linalg.svd(blocks[i].to(torch.float64).numpy(), compute_uv=False)
        measured = reference[0] / reference[-1]  # bf16 rounding caps it near 4e3
        assert relative_error(result.singular_values[i].tolist(), reference) < RELATIVE_CONTRACT
        # The fast Gram route is used exactly where its error bound holds.
        assert result.methods[i] == ("gram" if measured < GRAM_LIMIT else "svd"), measured
    if dtype != torch.bfloat16:
        assert measured == pytest.approx(kappa, rel=1e-3)


def test_gram_route_error_stays_under_its_certified_bound() -> None:
    """Measured error of the Gram route near the largest condition number it accepts."""
    blocks = torch.stack([torch.from_numpy(rotated_block(600, seed)) for seed in range(8)])
    result = slice_singular_values(blocks)
    assert set(result.methods) == {"gram"}
    for i in range(8):
        reference = np.linalg.svd(blocks[i].numpy(), compute_uv=False)
        assert relative_error(result.singular_values[i].tolist(), reference) < 1e-10


def test_non_finite_weights_poison_only_their_head() -> None:
    blocks = torch.randn(3, 4, 16, dtype=torch.float32)
    blocks[1, 2, 3] = float("nan")
    blocks[1, 0, 0] = float("inf")
    result = slice_singular_values(blocks)
    assert result.nonfinite == [0, 2, 0]
    assert np.isnan(result.singular_values[1]).all()
    assert np.isfinite(result.singular_values[[0, 2]]).all()


def test_non_finite_weights_in_float32_precision() -> None:
    """--spectral-dtype float32: the same per-head counts and nan rows as float64."""
    blocks = torch.randn(3, 4, 16, dtype=torch.float32)
    blocks[1, 2, 3] = float("nan")
    blocks[1, 0, 0] = float("-inf")
    result = slice_singular_values(blocks, dtype=torch.float32)
    assert result.nonfinite == [0, 2, 0]
    assert result.methods == ["svd32"] * 3
    assert np.isnan(result.singular_values[1]).all()
    for i in (0, 2):
        reference = np.linalg.svd(blocks[i].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(result.singular_values[i], reference, rtol=1e-5)


def test_zero_head_has_zero_singular_values() -> None:
    blocks = torch.randn(2, 4, 16)
    blocks[0] = 0
    result = slice_singular_values(blocks)
    assert result.singular_values[0].tolist() == [0.0] * 4
    assert result.nonfinite == [0, 0]


def test_huge_finite_float64_weights_fall_back_to_direct_svd() -> None:
    blocks = torch.randn(1, 4, 16, dtype=torch.float64) * 1e160  # Gram overflows float64
    result = slice_singular_values(blocks)
    reference = np.linalg.svd(blocks[0].numpy(), compute_uv=False)
    assert result.methods == ["svd"]
    assert relative_error(result.singular_values[0].tolist(), reference) < RELATIVE_CONTRACT


def test_metrics_are_served_with_the_values(tmp_path: Path) -> None:
    shape = LlamaShape(layers=1, heads=2, kv_heads=2, head_dim=4, hidden=16, mlp=False)
    tensors = random_llama_weights(shape, attention_only=True)
    tensors[attention_name(0, "q")][:4] = 0.0
    write_checkpoint(tmp_path, tensors, shape.config())
    engine = SpectraEngine(open_checkpoint(tmp_path), DEFAULT_REQUESTS)
    zero, healthy = engine.head(0, "q", 0), engine.head(0, "q", 1)
    assert np.isnan(zero.metrics["stable_rank"])
    assert zero.metrics["spectral_norm"] == 0
    assert healthy.metrics["spectral_norm"] == pytest.approx(healthy.singular_values[0])
