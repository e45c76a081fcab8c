"""Singular values of head slices and whole matrices, certified against LAPACK float64.

A slice ``W`` (``d x n`` with ``d <= n`` after choosing the cheaper orientation: transposing
leaves singular values unchanged) goes through up to three routes, cheapest first, and each
result is accepted only where that route's error bound is known to hold:

1. **Gram** (``method: "gram"``): the float64 Gram matrix ``G = W W^T`` (``d x d``) and
   ``eigvalsh``. Several times cheaper than an SVD, but it squares the condition number: the
   relative error of a singular value is about ``c * eps64 * kappa^2`` (``c`` measured below
   0.5 on rotated matrices ``U diag(s) V^T``; see the tests). Accepted when the computed
   ``lambda_min / lambda_max`` keeps ``eps64 * kappa^2`` under :data:`TARGET_RELATIVE_ERROR`
   (``kappa <~ 670``).
2. **CholeskyQR2** (``"cholqr2"``; Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014,
   Yamamoto et al. 2015), reusing that Gram matrix: ``G = L L^T``, ``Y = L^-1 W``,
   ``Y Y^T = L2 L2^T``; then ``W = (L L2) Q`` with ``Q`` orthonormal rows, so the singular
   values of ``W`` are those of the ``d x d`` triangle ``L L2``. The triangular solve is
   backward stable row by row, so this is backward stable like an SVD (relative error about
   ``eps64 * kappa``) provided ``Y`` is well conditioned, which is checked, not assumed:
   ``||Y Y^T - I||_F <= 0.1`` (it is about ``eps64 * kappa^2``, so this holds to
   ``kappa ~ 1e7``). It costs a triangular solve and a second Gram matrix, about 1.7 times
   the Gram route, where a direct SVD of the slice costs three to four times it.
3. **Householder QR** (``"qr"``): ``geqrf`` of the tall orientation and an SVD of its
   ``d x d`` R factor, unconditionally backward stable; for what CholeskyQR2 cannot certify
   (``kappa >~ 1e7``, rank-deficient slices).

``--spectral-dtype float32`` (``"svd32"``) is a direct float32 SVD, about 1e-6 relative, for
accelerators; never a float32 Gram matrix, which would lose every singular value below
``sigma_max * 3e-4``.

**Extreme magnitudes.** Where a slice's squared row norms (the Gram diagonal) leave
``[2**-256, 2**256]``, and always before a cast to float32, the slice is multiplied by the
exact power of two that brings its largest magnitude into ``[0.5, 1)``, and its singular
values are multiplied back. Rounding commutes with such scaling, so the result is the one an
unbounded exponent range would give: float64 weights of 1e-170 (whose Gram matrix would
underflow to zero) or of 1e39 decomposed in float32 (which would overflow) are measured, and
only a slice that is genuinely all zero, or holds NaN/Inf, is reported so.

**Same numbers on any number of threads.** On the CPU every slice is decomposed on one
thread (:func:`slice_executor` sets torch's intra-op threads to 1 in each of its threads;
BLAS and LAPACK summation order then never depends on a thread count), and slices run in
parallel on the executor. A
slice's values therefore do not depend on ``--spectral-threads``, pytest-xdist workers or
scheduling. Accelerators decompose a whole batch at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pytest_spectral.checkpoints.checkpoint import Geometry, Layout
from pytest_spectral.checkpoints.families import ExpertMatrix
from pytest_spectral.checkpoints.families.family import FUSED_MATRICES
from pytest_spectral.checkpoints.slices import fused_grid, whole_rows
from pytest_spectral.results import SliceSpectra

#: Relative error on singular values that the Gram route must provably stay under.
TARGET_RELATIVE_ERROR = 1e-10
_EPS64 = float(torch.finfo(torch.float64).eps)
#: Measured error of the float64 Gram route is below 0.5 * eps * kappa^2 (see tests); a
#: constant of 1 leaves a margin of two on top of the 10x margin of the target.
_GRAM_ERROR_CONSTANT = 1.0
#: Accept the Gram result when lambda_min / lambda_max is at least this (kappa <~ 670).
_GRAM_TRUST_RATIO = _GRAM_ERROR_CONSTANT * _EPS64 / TARGET_RELATIVE_ERROR
#: CholeskyQR2 is accepted when its first factor leaves Y this close to orthonormal rows
#: (||Y Y^T - I||_F); then kappa(Y) < 1.11 and the second factorisation is accurate.
_ORTHOGONALITY_TOLERANCE = 0.1
#: Slices whose largest squared row norm lies outside [2**-256, 2**256] are scaled by a power
#: of two first (float64 keeps every product that matters normal in that range).
_LOWEST_GRAM, _HIGHEST_GRAM = 2.0**-256, 2.0**256
#: Per-thread float64 slice buffers up to this size are kept for the next slice.
_REUSED_BUFFER_BYTES = 64 * 2**20


def head_blocks(
    weight: torch.Tensor, matrix: str, geometry: Geometry, layout: Layout
) -> torch.Tensor:
    """View the stored ``weight`` as a batch of head slices, one per distinct head.

    A Q/K/V head is ``geometry.head_rows(matrix)`` rows of the projection in ``nn.Linear``
    orientation, found through the family's fused layout (see
    :mod:`pytest_spectral.checkpoints.families`); an O head is as many columns of the output
    projection. Slices come back as ``[slices, d, in]`` or ``[slices, in, d]``, whichever keeps
    rows contiguous in memory (transposing a slice leaves its singular values unchanged, and
    a transposing copy upcasts 2.5x slower). Only grouped (Falcon-40B-style) queries need a
    copy.
    """
    d = geometry.head_rows(matrix)
    if matrix == "o":
        if layout.conv1d:  # stored [heads * d, hidden]: a head is a row block
            return weight.view(geometry.heads, d, weight.shape[1])
        return weight.view(weight.shape[0], geometry.heads, d).permute(1, 0, 2)
    groups, period, (start, stop) = fused_grid(matrix, geometry, layout.fused)
    if layout.conv1d:  # stored [in, rows]: a head is a column block
        grid = weight.view(weight.shape[0], groups, period)[:, :, start:stop]
        grid = grid.reshape(weight.shape[0], groups, -1, d)
        return grid.permute(1, 2, 0, 3).reshape(-1, weight.shape[0], d)
    grid = weight.view(groups, period, weight.shape[1])[:, start:stop]
    return grid.reshape(-1, d, weight.shape[1])


def whole_matrix(
    weight: torch.Tensor, matrix: str, geometry: Geometry, layout: Layout
) -> torch.Tensor:
    """The whole matrix for a matrix-scope item: the stored weight, Q, K or V's share of a
    fused one (in whatever orientation is cheapest: singular values do not care), or a latent
    down-projection's rows (:func:`~pytest_spectral.checkpoints.slices.whole_rows`)."""
    rows = whole_rows(matrix, geometry)
    if rows is not None:
        return weight[rows[0] : rows[1]]
    if matrix not in FUSED_MATRICES.get(layout.fused or "", ""):
        return weight
    blocks = head_blocks(weight, matrix, geometry, layout)
    if layout.conv1d:  # [slices, in, d] -> [in, slices * d]
        return blocks.permute(1, 0, 2).reshape(blocks.shape[1], -1)
    return blocks.reshape(-1, blocks.shape[2])


def expert_blocks(weights: list[torch.Tensor], matrix: ExpertMatrix) -> torch.Tensor:
    """Every expert's matrix of one kind, ``[experts, out, in]`` (``[experts, in, out]`` for
    a transposed store: singular values do not care).

    ``weights`` is the one 3-D tensor holding every expert, or one 2-D tensor per expert
    (stacked here: a copy of one layer's experts). A fused gate/up tensor gives this kind's
    part along the output axis: a half, or every other row or column from ``part`` on when
    the parts alternate (gpt-oss: ``gate_up[..., ::2]`` is the gate).
    """
    stack = torch.stack(weights) if matrix.per_expert else weights[0]
    if matrix.part is None:
        return stack
    axis = 2 if matrix.transposed else 1
    size = stack.shape[axis] // 2
    if matrix.interleaved:
        index = [slice(None)] * 3
        index[axis] = slice(matrix.part, None, 2)
        return stack[tuple(index)]
    return stack.narrow(axis, matrix.part * size, size)


@dataclass(frozen=True)
class _SliceResult:
    values: np.ndarray  # [r], float64, descending; nan where non-finite
    nonfinite: int
    method: str


class PendingSpectra:
    """Singular values of a batch of slices whose decomposition has been started.

    Starting every matrix of a layer before waiting for any lets the executor's threads share
    all of the layer's slices, whole matrices included.
    """

    def __init__(self, parts: list[Future[list[_SliceResult]]]) -> None:
        self._parts = parts

    def result(self) -> SliceSpectra:
        """Wait for every slice; re-raises the first slice's exception, if any."""
        slices = [s for part in self._parts for s in part.result()]
        return SliceSpectra(
            np.stack([s.values for s in slices]),
            [s.nonfinite for s in slices],
            [s.method for s in slices],
        )


def start_slices(
    blocks: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    executor: Executor | None = None,
) -> PendingSpectra:
    """Start decomposing each ``blocks[i]`` (``[slices, m, n]``, any float dtype).

    On the CPU, one task per slice on ``executor`` (inline without one); on an accelerator,
    one task for the whole batch.
    """
    device = torch.device(device)
    if device.type == "cpu":
        tasks = [partial(_cpu_slice, block, dtype) for block in blocks]
    else:
        tasks = [partial(_device_batch, blocks, dtype, device)]
    if executor is None:
        return PendingSpectra([_done(task) for task in tasks])
    return PendingSpectra([executor.submit(task) for task in tasks])


def slice_executor(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads for :func:`start_slices`, each with one intra-op thread.

    One intra-op thread makes each slice's BLAS/LAPACK calls sum in one fixed order, whatever
    the number of threads or workers. It must be set in every pool thread: a new thread would
    otherwise start an OpenMP team of all the cores for each product (4-7x slower, measured).
    """
    return ThreadPoolExecutor(
        max_workers=threads,
        thread_name_prefix="pytest-spectral-slice",
        initializer=torch.set_num_threads,
        initargs=(1,),
    )


def slice_singular_values(
    blocks: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    executor: Executor | None = None,
) -> SliceSpectra:
    """Singular values (float64 on the CPU, descending) of each ``blocks[i]``.

    With ``dtype=float64`` (the default) they are certified to about 1e-10 relative (see the
    module docstring); ``float32`` gives about 1e-6. ``blocks`` is ``[slices, m, n]``, in any
    floating dtype; non-finite slices get ``nan`` values and their count of NaN/Inf weights.
    """
    return start_slices(blocks, device=device, dtype=dtype, executor=executor).result()


def _done(task: Callable[[], list[_SliceResult]]) -> Future[list[_SliceResult]]:
    future: Future[list[_SliceResult]] = Future()
    try:
        future.set_result(task())
    except Exception as exc:
        future.set_exception(exc)
    return future


_thread_buffers = threading.local()


def _cpu_slice(block: torch.Tensor, dtype: torch.dtype) -> list[_SliceResult]:
    """One slice, upcast into a float64 buffer this thread reuses: it stays in cache, and
    no pages are faulted in per slice (measured faster than groups of 4 or 8 slices)."""
    shape = tuple(block.shape)
    buffer = getattr(_thread_buffers, "buffer", None)
    if buffer is None or tuple(buffer.shape) != shape:
        buffer = torch.empty(shape, dtype=torch.float64)
        small = buffer.numel() * buffer.element_size() <= _REUSED_BUFFER_BYTES
        _thread_buffers.buffer = buffer if small else None
    buffer.copy_(block)
    return _decompose(buffer[None], dtype)


def _device_batch(
    blocks: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> list[_SliceResult]:
    # Moved, then converted on the device; always a copy, since it is scaled in place.
    return _decompose(blocks.to(device).to(torch.float64, copy=True), dtype)


def _decompose(batch: torch.Tensor, dtype: torch.dtype) -> list[_SliceResult]:
    """Singular values of each float64 ``batch[i]`` (scaled in place where needed)."""
    count, rank = batch.shape[0], min(batch.shape[1:])
    wide = batch if batch.shape[1] <= batch.shape[2] else batch.mT
    gram = None
    if dtype == torch.float64:
        gram = _lower_gram(wide)
        # The Gram diagonal holds the squared row norms: all finite and within range means
        # every weight is finite and nothing that matters under- or overflowed.
        top = gram.diagonal(0, 1, 2).amax(1)
        in_range = bool(((top >= _LOWEST_GRAM) & (top <= _HIGHEST_GRAM)).all())
    if gram is None or not in_range:
        exponents, finite, work = _balance(batch)
        if gram is not None:
            gram = _lower_gram(wide)  # of the balanced slices
    else:
        exponents = torch.zeros(count, dtype=torch.int32)
        finite = work = torch.ones(count, dtype=torch.bool, device=batch.device)

    values = torch.zeros(count, rank, dtype=torch.float64)  # all-zero slices stay zero
    methods = ["gram" if gram is not None else "svd32"] * count
    chosen = work.cpu()
    if bool(chosen.any()):
        if gram is None:
            values[chosen] = _svdvals(_select(wide, work).to(torch.float32)).to(torch.float64)
        else:
            computed, routes = _certified(_select(wide, work), _select(gram, work))
            values[chosen] = computed
            for i, route in zip(chosen.nonzero().flatten().tolist(), routes, strict=True):
                methods[i] = route

    nonfinite = [0] * count
    for i in (~finite).cpu().nonzero().flatten().tolist():
        nonfinite[i] = int((~torch.isfinite(batch[i])).sum())
        values[i] = float("nan")
    unscaled = np.ldexp(values.numpy(), exponents.cpu().numpy()[:, None])
    return [_SliceResult(unscaled[i], nonfinite[i], methods[i]) for i in range(count)]


def _balance(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale each finite, non-zero slice in place by the power of two that brings its largest
    magnitude into ``[0.5, 1)``. Returns each slice's exponent (to multiply its singular values
    back), whether it is finite, and whether it has anything to decompose (finite, non-zero)."""
    low, high = torch.aminmax(batch.flatten(1), dim=1)
    magnitude = torch.maximum(-low, high)  # nan where a slice holds a NaN
    finite = torch.isfinite(magnitude)
    work = finite & (magnitude > 0)
    exponents = torch.where(work, torch.frexp(magnitude).exponent, 0)
    _scale_by_power_of_two(batch, -exponents)
    return exponents, finite, work


def _scale_by_power_of_two(batch: torch.Tensor, powers: torch.Tensor) -> None:
    """``batch[i] *= 2**powers[i]``, exactly, in two steps so neither factor overflows."""
    first = torch.div(powers, 2, rounding_mode="floor")
    for part in (first, powers - first):
        factor = torch.pow(2.0, part.to(torch.float64))
        batch.mul_(factor[:, None, None])


def _certified(wide: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Singular values ([count, r], CPU, descending) of each slice and the route taken."""
    eigen = torch.linalg.eigvalsh(gram)  # ascending; reads the lower triangle only
    values = eigen.clamp_min(0).sqrt().flip(-1).cpu()
    routes = ["gram"] * wide.shape[0]
    untrusted = eigen[:, 0] < eigen[:, -1] * _GRAM_TRUST_RATIO
    if not bool(untrusted.any()):
        return values, routes
    indices = untrusted.cpu().nonzero().flatten().tolist()
    refined, certified = _cholesky_qr2(_select(wide, untrusted), _select(gram, untrusted))
    for position, i in enumerate(indices):
        if certified[position]:
            values[i] = refined[position]
            routes[i] = "cholqr2"
        else:
            values[i] = _householder(wide[i : i + 1])[0]
            routes[i] = "qr"
    return values, routes


def _cholesky_qr2(wide: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """Singular values by CholeskyQR2 from ``gram = wide wide^T``, and whether each is
    certified. A factorisation that fails is replaced by the identity so the batch stays
    finite; its slice is then simply not certified."""
    factor, info = torch.linalg.cholesky_ex(gram)  # lower: gram = L L^T
    factor = _identity_where_failed(factor, info)
    orthonormal = _solve_lower(factor, wide)  # Y = L^-1 W, rows nearly orthonormal
    second = _lower_gram(orthonormal)
    off_diagonal = second.tril(-1).square().sum((1, 2))
    diagonal = (second.diagonal(0, 1, 2) - 1).square().sum(1)
    deviation = (2 * off_diagonal + diagonal).sqrt()  # ||Y Y^T - I||_F
    factor2, info2 = torch.linalg.cholesky_ex(second)
    factor2 = _identity_where_failed(factor2, info2)
    certified = (info == 0) & (info2 == 0) & (deviation <= _ORTHOGONALITY_TOLERANCE)
    return _svdvals(factor @ factor2), certified.cpu().tolist()


def _identity_where_failed(factor: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    identity = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return torch.where((info == 0)[:, None, None], factor, identity)


def _householder(wide: torch.Tensor) -> torch.Tensor:
    """Singular values from the R factor of a Householder QR of the tall orientation."""
    triangle = torch.linalg.qr(wide.mT, mode="r").R
    return _svdvals(triangle).cpu()


def _solve_lower(factor: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """``L^-1 W``, solved in whichever form reads ``W`` in place (LAPACK is column-major)."""
    if wide.is_contiguous():  # W is row-major: solve Y^T L^T = W^T, W^T column-major
        return torch.linalg.solve_triangular(factor.mT, wide.mT, upper=True, left=False).mT
    return torch.linalg.solve_triangular(factor, wide, upper=False)


def _lower_gram(wide: torch.Tensor) -> torch.Tensor:
    """``wide @ wide^T``, lower triangle only (the upper is zero), in four column panels.

    ``eigvalsh`` and ``cholesky`` read only the lower triangle, so skipping the upper panels
    saves about a quarter of the multiplications.
    """
    count, rank = wide.shape[0], wide.shape[1]
    gram = torch.zeros(count, rank, rank, dtype=wide.dtype, device=wide.device)
    width = max(32, -(-rank // 4))
    for start in range(0, rank, width):
        stop = min(start + width, rank)
        gram[:, start:, start:stop] = wide[:, start:] @ wide[:, start:stop].mT
    return gram


def _svdvals(batch: torch.Tensor) -> torch.Tensor:
    if batch.device.type == "cuda":
        # The default CUDA driver (gesvdj) is iterative; gesvd is the accurate one.
        return torch.linalg.svdvals(batch, driver="gesvd").cpu()
    return torch.linalg.svdvals(batch).cpu()


def _select(batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``batch[mask]`` without a copy when every slice is selected (one slice on the CPU)."""
    return batch if bool(mask.all()) else batch[mask]
