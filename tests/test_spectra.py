"""Per-head singular values against an independent float64 LAPACK reference (numpy).

The reference slices each head straight from the safetensors file, as the issue defines it:
Q/K/V rows ``[h*d:(h+1)*d]``, O columns ``[:, h*d:(h+1)*d]``, query head h using K/V head
``h // (heads // kv_heads)``.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pytest_spectral.checkpoints.checkpoint import MATRICES, open_checkpoint
from pytest_spectral.checkpoints.families import ExpertMatrix
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


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the engine runs: one intra-op thread (slices run in parallel on a pool instead).

    Also keeps torch's spinning OpenMP threads from competing with numpy's BLAS threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    original = spectra.start_slices

    def spy(blocks: torch.Tensor, **kwargs: object) -> spectra.PendingSpectra:
        batches.append(tuple(blocks.shape))
        return original(blocks, **kwargs)

    monkeypatch.setattr(spectra, "start_slices", spy)
    engine = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS)
    for head in range(8):
        for matrix in MATRICES:
            engine.head(0, matrix, head)
    assert sorted(batches) == sorted([(8, 8, 64), (2, 8, 64), (2, 8, 64), (8, 64, 8)])
    assert engine.head(0, "k", 0) is engine.head(0, "k", 3)
    assert engine.head(0, "k", 3) is not engine.head(0, "k", 4)


def rotated_blocks(count: int, rows: int, cols: int, kappa: float, seed: int = 0) -> torch.Tensor:
    """float64 slices ``U diag(s) V^T`` with Haar-random U, V and s log-spaced from 1 to 1/kappa.

    Rotated, not graded: scaling the rows of a random matrix instead would keep each Gram
    entry accurate relative to its own row norms and hide the Gram route's eps * kappa^2 error.
    """
    rng = np.random.default_rng(seed)
    spectrum = np.logspace(0, -np.log10(kappa), rows)
    blocks = []
    for _ in range(count):
        left, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
        right, _ = np.linalg.qr(rng.standard_normal((cols, rows)))
        blocks.append((left * spectrum) @ right.T)
    return torch.from_numpy(np.stack(blocks))


def numpy_values(blocks: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(blocks.to(torch.float64).numpy(), compute_uv=False)


@pytest.mark.parametrize("orientation", ["wide", "tall"])
@pytest.mark.parametrize(
    ("kappa", "route"),
    [(1.0, "gram"), (1e2, "gram"), (5e2, "gram"), (1e3, "cholqr2"), (1e4, "cholqr2"),
     (1e5, "cholqr2"), (1e6, "cholqr2")],
)  # fmt: skip
def test_accuracy_contract_up_to_condition_number_1e6(kappa, route, orientation) -> None:
    blocks = rotated_blocks(4, 32, 512, kappa)
    if orientation == "tall":  # as O slices are stored
        blocks = blocks.mT.contiguous()
    result = slice_singular_values(blocks)
    reference = numpy_values(blocks)
    assert np.max(np.abs(result.singular_values - reference) / reference) < RELATIVE_CONTRACT
    # The fast Gram route is used only where its error bound holds (kappa <~ 670).
    assert result.methods == [route] * 4


def test_gram_route_error_at_the_largest_condition_number_it_accepts() -> None:
    blocks = rotated_blocks(8, 32, 512, 600.0, seed=1)
    result = slice_singular_values(blocks)
    assert set(result.methods) == {"gram"}
    error = np.abs(result.singular_values - numpy_values(blocks)) / numpy_values(blocks)
    assert error.max() < spectra.TARGET_RELATIVE_ERROR


def test_cholesky_qr2_is_as_accurate_as_an_svd() -> None:
    """Backward stable: error about eps * kappa, as LAPACK's own SVD, not eps * kappa^2."""
    kappa = 1e6
    blocks = rotated_blocks(3, 96, 1536, kappa, seed=2)
    result = slice_singular_values(blocks)
    assert set(result.methods) == {"cholqr2"}
    error = np.abs(result.singular_values - numpy_values(blocks)) / numpy_values(blocks)
    assert error.max() < 10 * np.finfo(np.float64).eps * kappa


def test_householder_qr_takes_what_cholesky_qr2_cannot_certify() -> None:
    kappa = 1e9  # Y = L^-1 W is then too far from orthonormal rows (about eps * kappa^2)
    ill = rotated_blocks(2, 32, 512, kappa, seed=3)
    deficient = rotated_blocks(1, 32, 512, 10.0, seed=4)
    deficient[0, 3:] = 0.0  # rank 3: the Gram matrix is singular and Cholesky fails
    blocks = torch.cat([ill, deficient])
    result = slice_singular_values(blocks)
    assert result.methods == ["qr", "qr", "qr"]
    reference = numpy_values(blocks)
    error = np.abs(result.singular_values - reference) / reference[:, :1]
    assert error.max() < 100 * np.finfo(np.float64).eps  # backward stable: eps * sigma_max


def spectrum_block(spectrum: list[float], cols: int = 64, seed: int = 5) -> torch.Tensor:
    """One float64 slice ``U diag(spectrum) V^T`` with Haar-random U, V."""
    rng = np.random.default_rng(seed)
    rows = len(spectrum)
    left, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    right, _ = np.linalg.qr(rng.standard_normal((cols, rows)))
    return torch.from_numpy((left * np.asarray(spectrum)) @ right.T)[None]


@pytest.mark.parametrize(
    "spectrum",
    [[1.0] * 7 + [1e-3], [1.0] + [1e-3] * 7],
    ids=["one-small-value", "one-large-value"],
)
def test_the_gram_route_is_judged_by_the_extreme_eigenvalues(spectrum) -> None:
    """lambda_min / lambda_max = 1e-6 < eps / 1e-10, whatever the values in between: the
    Gram route is not trusted, and CholeskyQR2 certifies a kappa of 1e3."""
    blocks = spectrum_block(spectrum)
    result = slice_singular_values(blocks)
    assert result.methods == ["cholqr2"]
    reference = numpy_values(blocks)
    assert np.max(np.abs(result.singular_values - reference) / reference) < RELATIVE_CONTRACT


@pytest.mark.parametrize(("rows", "cols"), [(1, 9), (9, 1)], ids=["one-row", "one-column"])
def test_a_slice_of_one_row_or_column_has_its_norm_as_singular_value(rows, cols) -> None:
    vector = torch.arange(1.0, 1.0 + rows * cols, dtype=torch.float64).reshape(1, rows, cols)
    result = slice_singular_values(torch.cat([vector, 2 * vector]))
    norm = float(np.sqrt(np.sum(np.arange(1.0, 1.0 + rows * cols) ** 2)))
    np.testing.assert_allclose(result.singular_values[:, 0], [norm, 2 * norm], rtol=1e-15)
    assert result.methods == ["gram", "gram"]


def test_gram_exactly_at_the_trust_ratio_is_trusted() -> None:
    """Accepted when lambda_min / lambda_max is *at least* the ratio (eigvalsh of a diagonal
    matrix returns its diagonal exactly)."""
    ratio = spectra._GRAM_TRUST_RATIO
    gram = torch.tensor([[[ratio, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    wide = torch.tensor([[[np.sqrt(ratio), 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    values, routes = spectra._certified(wide, gram)
    assert routes == ["gram"]
    np.testing.assert_array_equal(values.numpy(), [[1.0, np.sqrt(ratio)]])


def test_a_batch_of_normal_and_tiny_slices_scales_the_tiny_ones() -> None:
    """Each slice's own row norms decide the scaling, not the batch's largest."""
    normal = rotated_blocks(1, 8, 32, 10.0, seed=6)
    blocks = torch.cat([normal, 1e-170 * normal])
    batched = spectra._device_batch(blocks, torch.float64, torch.device("cpu"))
    values = np.stack([s.values for s in batched])
    reference = numpy_values(blocks)
    assert np.max(np.abs(values - reference) / reference) < RELATIVE_CONTRACT
    assert [s.method for s in batched] == ["gram", "gram"]


def test_float32_route_values_are_float32_numbers() -> None:
    """``svd32`` is a float32 SVD: its values are float32 numbers (scaled by powers of two)."""
    blocks = rotated_blocks(2, 8, 32, 10.0, seed=7)
    result = slice_singular_values(blocks, dtype=torch.float32)
    values = result.singular_values
    np.testing.assert_array_equal(values.astype(np.float32).astype(np.float64), values)
    assert np.max(np.abs(values - numpy_values(blocks)) / numpy_values(blocks)) < 1e-5
    assert result.methods == ["svd32", "svd32"]


@pytest.mark.parametrize(
    ("offset", "certified"),
    [(0.0, True), (0.065, True), (0.07062267420658204, True), (0.0707, False), (0.1, False)],
)
def test_cholesky_qr2_certifies_up_to_a_frobenius_deviation_of_one_tenth(
    offset: float, certified: bool
) -> None:
    """With ``gram = I``, ``L = I`` and ``Y = W``: certified iff ``||W W^T - I||_F <= 0.1``;
    here ``W W^T - I = [[0, b], [b, b^2]]``, so the deviation is about ``sqrt(2) * b``
    (exactly 0.1 in float64 at the third offset)."""
    wide = torch.tensor([[[1.0, 0.0], [offset, 1.0]]], dtype=torch.float64)
    gram = torch.eye(2, dtype=torch.float64)[None]
    deviation = np.linalg.norm(wide[0].numpy() @ wide[0].numpy().T - np.eye(2))
    assert (deviation <= 0.1 + 1e-15) == certified
    values, flags = spectra._cholesky_qr2(wide, gram)
    assert flags == [certified]
    np.testing.assert_allclose(values.numpy(), numpy_values(wide), rtol=1e-14)


def test_cholesky_qr2_never_certifies_a_failed_factorisation() -> None:
    """A Gram matrix that is not positive definite fails Cholesky; the identity that replaces
    the factor leaves ``Y = W`` orthonormal, which must still not certify it."""
    wide = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    gram = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)
    values, flags = spectra._cholesky_qr2(wide, gram)
    assert flags == [False]
    assert torch.isfinite(values).all()


def test_lower_gram_holds_the_lower_triangle_of_w_w_transpose_and_zeros_far_above() -> None:
    """Computed in column panels of at least 32 (132 rows: four panels of 33): the lower
    triangle is ``W W^T``, and nothing is computed more than a panel above the diagonal."""
    wide = torch.from_numpy(np.random.default_rng(8).standard_normal((1, 132, 140)))
    gram = spectra._lower_gram(wide)[0].numpy()
    full = wide[0].numpy() @ wide[0].numpy().T
    np.testing.assert_allclose(np.tril(gram), np.tril(full), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.triu(gram, 33), np.zeros_like(gram))


def test_lower_gram_stays_on_the_slices_device() -> None:
    wide = torch.empty(2, 3, 5, dtype=torch.float64, device="meta")
    gram = spectra._lower_gram(wide)
    assert (gram.device, gram.dtype, gram.shape) == (torch.device("meta"), torch.float64, (2, 3, 3))


def test_start_slices_decomposes_on_the_cpu_by_default() -> None:
    blocks = rotated_blocks(2, 8, 32, 10.0, seed=9)
    with RecordingExecutor() as pool:
        result = spectra.start_slices(blocks, executor=pool).result()
    assert pool.submitted == 2  # one task per slice: the CPU route
    reference = numpy_values(blocks)
    assert np.max(np.abs(result.singular_values - reference) / reference) < RELATIVE_CONTRACT
    assert result.methods == ["gram", "gram"]


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
def test_accuracy_contract_for_every_storage_dtype(kappa: float, dtype: torch.dtype) -> None:
    """1e-9 relative to LAPACK float64 on the stored values, whichever route each head took."""
    blocks = torch.stack([torch.from_numpy(rotated_block(kappa, seed)) for seed in range(4)])
    blocks = blocks.to(dtype)
    result = slice_singular_values(blocks)
    for i in range(4):
        reference = np.linalg.svd(blocks[i].to(torch.float64).numpy(), compute_uv=False)
        measured = reference[0] / reference[-1]  # bf16 rounding caps it near 4e3
        assert relative_error(result.singular_values[i].tolist(), reference) < RELATIVE_CONTRACT
        # The fast Gram route is used exactly where its error bound holds.
        expected = ("gram",) if measured < GRAM_LIMIT else ("cholqr2", "qr")
        assert result.methods[i] in expected, measured
    if dtype != torch.bfloat16:
        assert measured == pytest.approx(kappa, rel=1e-3)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_infinite_weight_without_nan_poisons_only_its_head(dtype: torch.dtype) -> None:
    """A slice holding +-inf but no NaN (its Gram matrix and largest magnitude are then
    infinite, not NaN) is reported, not decomposed: LAPACK would fail on it."""
    blocks = torch.randn(3, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    blocks[1, 1, 2] = float("inf")
    blocks[1, 3, 0] = float("-inf")
    result = slice_singular_values(blocks, dtype=dtype)
    assert result.nonfinite == [0, 2, 0]
    assert np.isnan(result.singular_values[1]).all()
    reference = numpy_values(blocks[[0, 2]])
    np.testing.assert_allclose(result.singular_values[[0, 2]], reference, rtol=1e-5)


def test_zero_head_has_zero_singular_values() -> None:
    blocks = torch.randn(2, 4, 16)
    blocks[0] = 0
    result = slice_singular_values(blocks)
    assert result.singular_values[0].tolist() == [0.0] * 4
    assert result.nonfinite == [0, 0]


@pytest.mark.parametrize("power", [-1000, -600, 600, 1000])
def test_extreme_magnitudes_are_scaled_exactly(power: int) -> None:
    """Weights times 2**power give exactly the singular values times 2**power."""
    blocks = torch.cat([rotated_blocks(2, 16, 64, 10.0), rotated_blocks(2, 16, 64, 1e4)])
    plain = slice_singular_values(blocks)
    scaled = slice_singular_values(blocks * 2.0**power)
    assert scaled.methods == plain.methods == ["gram", "gram", "cholqr2", "cholqr2"]
    assert (scaled.singular_values == np.ldexp(plain.singular_values, power)).all()


@pytest.mark.parametrize("scale", [1e-170, 1e-300, 1e160, 1e300])
def test_tiny_and_huge_float64_weights_are_measured(scale: float) -> None:
    blocks = rotated_blocks(2, 16, 64, 100.0) * scale  # a Gram matrix would under/overflow
    result = slice_singular_values(blocks)
    reference = numpy_values(blocks)
    assert result.nonfinite == [0, 0]
    assert np.max(np.abs(result.singular_values - reference) / reference) < RELATIVE_CONTRACT


def test_float32_decomposition_of_float64_weights_beyond_float32_range() -> None:
    blocks = rotated_blocks(2, 16, 64, 100.0) * 1e39  # float32 overflows at 3.4e38
    result = slice_singular_values(blocks, dtype=torch.float32)
    reference = numpy_values(blocks)
    assert result.nonfinite == [0, 0]
    assert result.methods == ["svd32", "svd32"]
    assert np.max(np.abs(result.singular_values - reference) / reference) < 1e-5


def test_a_single_subnormal_weight_is_not_a_zero_matrix() -> None:
    blocks = torch.zeros(1, 4, 16, dtype=torch.float64)
    blocks[0, 2, 5] = 5e-324  # the smallest positive float64
    for dtype in (torch.float64, torch.float32):
        values = slice_singular_values(blocks, dtype=dtype).singular_values[0]
        assert values.tolist() == [5e-324, 0.0, 0.0, 0.0]


def test_values_do_not_depend_on_the_number_of_threads() -> None:
    """Each slice is decomposed on one thread, so the pool's size cannot change a bit."""
    blocks = torch.cat([rotated_blocks(6, 64, 1024, kappa) for kappa in (2.0, 1e4, 1e9)])
    alone = slice_singular_values(blocks)
    for workers in (1, 2, 3):
        with spectra.slice_executor(workers) as pool:
            shared = slice_singular_values(blocks, executor=pool)
        assert shared.methods == alone.methods
        assert (shared.singular_values == alone.singular_values).all()
    assert set(alone.methods) == {"gram", "cholqr2", "qr"}


def test_the_slice_pool_runs_that_many_threads_of_one_intra_op_thread_each() -> None:
    """As many pool threads as asked for, named for thread dumps, each with one intra-op
    thread; the calling thread's own count is left alone (torch's OpenMP builds, Linux's,
    keep the count per thread)."""
    torch.set_num_threads(2)  # the autouse fixture restores the count afterwards
    together = threading.Barrier(3, timeout=30)

    def probe(wait: bool) -> tuple[str, int]:
        if wait:
            together.wait()  # three tasks at once: the pool has at least three threads
        return threading.current_thread().name, torch.get_num_threads()

    with spectra.slice_executor(3) as pool:
        futures = [pool.submit(probe, index < 3) for index in range(12)]
        seen = [future.result() for future in futures]
    assert len({name for name, _ in seen}) == 3
    assert all(name.startswith("pytest-spectral-slice_") for name, _ in seen)
    assert {threads for _, threads in seen} == {1}
    assert torch.get_num_threads() == 2


def test_a_thread_reuses_one_float64_buffer_for_slices_of_one_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each slice is upcast into a buffer its thread keeps for the next slice of that shape
    (no allocation or page faults per slice); another shape gets a buffer of its own."""
    monkeypatch.setattr(spectra._thread_buffers, "buffer", None, raising=False)
    blocks = torch.randn(3, 8, 32, dtype=torch.bfloat16)
    slice_singular_values(blocks[:2])
    buffer = spectra._thread_buffers.buffer
    slice_singular_values(blocks[2:])
    assert spectra._thread_buffers.buffer is buffer
    assert (buffer.dtype, tuple(buffer.shape)) == (torch.float64, (8, 32))
    slice_singular_values(blocks.mT)
    assert tuple(spectra._thread_buffers.buffer.shape) == (32, 8)


@pytest.mark.parametrize(("rows", "kept"), [(16, True), (17, False)])
def test_a_thread_keeps_only_buffers_up_to_the_size_limit(monkeypatch, rows, kept) -> None:
    """A buffer over ``_REUSED_BUFFER_BYTES`` is not held between slices (memory); the limit
    is lowered to 1 KiB here: 16 x 8 float64 values are exactly 1 KiB."""
    monkeypatch.setattr(spectra, "_REUSED_BUFFER_BYTES", 1024)
    monkeypatch.setattr(spectra, "_decompose", lambda batch, dtype: [])
    monkeypatch.setattr(spectra._thread_buffers, "buffer", None, raising=False)
    spectra._cpu_slice(torch.ones(rows, 8, dtype=torch.float32), torch.float64)
    assert (spectra._thread_buffers.buffer is not None) == kept


def test_selecting_every_slice_makes_no_copy() -> None:
    batch = torch.randn(3, 4, 8, dtype=torch.float64)
    assert spectra._select(batch, torch.tensor([True, True, True])) is batch
    assert torch.equal(spectra._select(batch, torch.tensor([True, False, True])), batch[[0, 2]])


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


def test_batched_route_of_accelerators_agrees_with_the_per_slice_route() -> None:
    """Accelerators decompose a whole batch at once; run that code on the CPU to check it
    selects, routes and scales each slice as the per-slice CPU route does."""
    blocks = torch.cat(
        [
            rotated_blocks(2, 16, 64, 10.0),
            rotated_blocks(2, 16, 64, 1e5),
            rotated_blocks(1, 16, 64, 1e9),
            rotated_blocks(1, 16, 64, 10.0) * 1e-170,
            torch.zeros(1, 16, 64, dtype=torch.float64),
            rotated_blocks(1, 16, 64, 10.0),
        ]
    )
    blocks[-1, 3, 4] = float("nan")
    original = blocks.clone()
    for batch in (blocks, blocks.mT):
        per_slice = slice_singular_values(batch)
        batched = spectra._device_batch(batch, torch.float64, torch.device("cpu"))
        assert [s.method for s in batched] == per_slice.methods
        assert per_slice.methods == ["gram"] * 2 + ["cholqr2"] * 2 + ["qr"] + ["gram"] * 3
        assert [s.nonfinite for s in batched] == per_slice.nonfinite == [0] * 7 + [1]
        values = np.stack([s.values for s in batched])
        np.testing.assert_allclose(values, per_slice.singular_values, rtol=1e-9)
        assert (values[6] == 0).all()
        assert np.isnan(values[7]).all()
        float32 = spectra._device_batch(batch, torch.float32, torch.device("cpu"))
        single = np.stack([s.values for s in float32])[:7]
        # float32's error is absolute, about eps32 * sigma_max
        assert (np.abs(single - values[:7]) <= 1e-5 * values[:7, :1]).all()
    torch.testing.assert_close(blocks, original, rtol=0, atol=0, equal_nan=True)  # not scaled


def test_slices_whose_weights_are_all_negative_are_measured() -> None:
    """The scaling to ``[0.5, 1)`` goes by the largest magnitude, here the most negative
    weight: in float32 (always scaled) and for tiny float64 weights (scaled past the Gram
    matrix's range) alike."""
    negative = -rotated_blocks(2, 16, 64, 10.0).abs()
    tiny = slice_singular_values(negative * 1e-170)
    reference = numpy_values(negative * 1e-170)
    assert np.max(np.abs(tiny.singular_values - reference) / reference) < RELATIVE_CONTRACT
    single = slice_singular_values(negative, dtype=torch.float32).singular_values
    reference = numpy_values(negative)
    assert (np.abs(single - reference) <= 1e-5 * reference[:, :1]).all()


def test_the_accelerator_route_decomposes_stored_weights_in_float64() -> None:
    """float32 (or bfloat16) weights are upcast before the Gram matrix is formed: a float32
    Gram matrix would miss the 1e-9 contract by two orders of magnitude."""
    blocks = torch.from_numpy(np.stack([rotated_block(100.0, seed) for seed in range(3)]))
    blocks = blocks.to(torch.float32)
    batched = spectra._device_batch(blocks, torch.float64, torch.device("cpu"))
    reference = numpy_values(blocks)
    values = np.stack([s.values for s in batched])
    assert np.max(np.abs(values - reference) / reference) < RELATIVE_CONTRACT


def test_the_accelerator_route_moves_the_batch_to_its_device_in_float64(monkeypatch) -> None:
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(spectra, "_decompose", lambda batch, dtype: seen.append(batch) or [])
    blocks = torch.ones(2, 3, 5, dtype=torch.bfloat16)
    spectra._device_batch(blocks, torch.float32, torch.device("meta"))  # meta: a non-CPU device
    (batch,) = seen
    assert (batch.device, batch.dtype, batch.shape) == (
        torch.device("meta"),
        torch.float64,
        (2, 3, 5),
    )


class RecordingExecutor(ThreadPoolExecutor):
    """A one-thread pool that counts the tasks submitted to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_an_accelerator_gets_the_whole_batch_as_one_task_on_the_executor(monkeypatch) -> None:
    calls: list[tuple[torch.Tensor, torch.dtype, torch.device]] = []
    accelerator_route = spectra._device_batch

    def on_the_cpu(blocks: torch.Tensor, dtype: torch.dtype, device: torch.device):
        calls.append((blocks, dtype, device))
        return accelerator_route(blocks, dtype, torch.device("cpu"))

    monkeypatch.setattr(spectra, "_device_batch", on_the_cpu)
    blocks = rotated_blocks(3, 8, 32, 10.0)
    with RecordingExecutor() as pool:
        result = slice_singular_values(blocks, device="cuda", dtype=torch.float32, executor=pool)
    assert pool.submitted == 1
    [(batch, dtype, device)] = calls
    assert (batch is blocks, dtype, device) == (True, torch.float32, torch.device("cuda"))
    assert result.methods == ["svd32"] * 3


def test_each_cpu_slice_is_one_task_on_the_given_executor() -> None:
    blocks = rotated_blocks(3, 8, 32, 10.0)
    with RecordingExecutor() as pool:
        result = slice_singular_values(blocks, executor=pool)
    assert pool.submitted == 3
    reference = numpy_values(blocks)
    assert np.max(np.abs(result.singular_values - reference) / reference) < RELATIVE_CONTRACT


@pytest.mark.parametrize("on_a_pool", [False, True], ids=["inline", "pool"])
def test_a_failing_slice_raises_its_error_when_the_result_is_asked_for(
    monkeypatch, on_a_pool: bool
) -> None:
    """Inline (no executor) as on a pool: starting never raises, waiting re-raises the
    slice's own exception."""

    def failing(block: torch.Tensor, dtype: torch.dtype) -> list:
        raise RuntimeError("the decomposition of this slice failed")

    monkeypatch.setattr(spectra, "_cpu_slice", failing)
    with spectra.slice_executor(1) if on_a_pool else contextlib.nullcontext() as pool:
        pending = spectra.start_slices(torch.ones(2, 3, 4), executor=pool)
        with pytest.raises(RuntimeError, match="the decomposition of this slice failed"):
            pending.result()


def arange_experts(*shape: int) -> torch.Tensor:
    """Expert tensor whose entries count 0, 1, 2, ... in storage order."""
    return torch.arange(int(np.prod(shape))).reshape(shape)


@pytest.mark.parametrize(
    ("weights", "matrix", "expected"),
    [
        pytest.param(  # one 2-D weight per expert, stacked on a new first axis
            [arange_experts(2, 3), arange_experts(2, 3) + 6],
            ExpertMatrix("mlp.experts.{expert}.down_proj"),
            [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]],
            id="per-expert",
        ),
        pytest.param(  # one 3-D tensor holding every expert, as stored
            [arange_experts(2, 2, 3)],
            ExpertMatrix("mlp.experts.down_proj"),
            [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]],
            id="stacked",
        ),
        pytest.param(  # [experts, 2 * out, in]: the gate is the first half of the rows
            [arange_experts(2, 4, 3)],
            ExpertMatrix("mlp.experts.gate_up_proj", part=0),
            [[[0, 1, 2], [3, 4, 5]], [[12, 13, 14], [15, 16, 17]]],
            id="gate-half",
        ),
        pytest.param(  # ... and the up projection the second half
            [arange_experts(2, 4, 3)],
            ExpertMatrix("mlp.experts.gate_up_proj", part=1),
            [[[6, 7, 8], [9, 10, 11]], [[18, 19, 20], [21, 22, 23]]],
            id="up-half",
        ),
        pytest.param(  # [experts, in, 2 * out]: halves of the columns
            [arange_experts(2, 3, 4)],
            ExpertMatrix("mlp.experts.gate_up_proj", transposed=True, part=0),
            [[[0, 1], [4, 5], [8, 9]], [[12, 13], [16, 17], [20, 21]]],
            id="gate-half-transposed",
        ),
        pytest.param(
            [arange_experts(2, 3, 4)],
            ExpertMatrix("mlp.experts.gate_up_proj", transposed=True, part=1),
            [[[2, 3], [6, 7], [10, 11]], [[14, 15], [18, 19], [22, 23]]],
            id="up-half-transposed",
        ),
        pytest.param(  # gpt-oss: [experts, in, 2 * out], gate and up columns alternate
            [arange_experts(2, 2, 6)],
            ExpertMatrix("mlp.experts.gate_up_proj", transposed=True, part=0, interleaved=True),
            [[[0, 2, 4], [6, 8, 10]], [[12, 14, 16], [18, 20, 22]]],
            id="gate-interleaved-transposed",
        ),
        pytest.param(
            [arange_experts(2, 2, 6)],
            ExpertMatrix("mlp.experts.gate_up_proj", transposed=True, part=1, interleaved=True),
            [[[1, 3, 5], [7, 9, 11]], [[13, 15, 17], [19, 21, 23]]],
            id="up-interleaved-transposed",
        ),
        pytest.param(  # [experts, 2 * out, in], gate and up rows alternate
            [arange_experts(2, 6, 2)],
            ExpertMatrix("mlp.experts.gate_up_proj", part=0, interleaved=True),
            [[[0, 1], [4, 5], [8, 9]], [[12, 13], [16, 17], [20, 21]]],
            id="gate-interleaved",
        ),
        pytest.param(
            [arange_experts(2, 6, 2)],
            ExpertMatrix("mlp.experts.gate_up_proj", part=1, interleaved=True),
            [[[2, 3], [6, 7], [10, 11]], [[14, 15], [18, 19], [22, 23]]],
            id="up-interleaved",
        ),
    ],
)
def test_expert_blocks_take_this_kinds_part_of_each_expert(weights, matrix, expected) -> None:
    """``[experts, out, in]`` (``[experts, in, out]`` transposed), entries stated by hand."""
    blocks = spectra.expert_blocks(weights, matrix)
    assert blocks.tolist() == expected
