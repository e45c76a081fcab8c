"""Singular values of per-head circuits, computed from head_dim x head_dim cores.

A query head h attends with the QK circuit ``W_Q_h^T W_K_g`` and writes with the OV circuit
``W_O_h W_V_g`` (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"),
g being the K/V head it shares under grouped-query attention. Both are ``hidden x hidden``
products ``F_a F_b^T`` of two ``hidden x head_dim`` factors: ``F_a = W_Q_h^T, F_b = W_K_g^T``
for QK, ``F_a = W_O_h, F_b = W_V_g^T`` for OV. With thin QR factorisations ``F = Q R``
(``Q`` with orthonormal columns, ``R`` ``d x d`` upper triangular),
``F_a F_b^T = Q_a (R_a R_b^T) Q_b^T``, and orthonormal columns leave singular values alone:
``sigma(F_a F_b^T) = sigma(R_a R_b^T)``. So the hidden x hidden product is never formed: one QR
per distinct slice (a K/V slice once for its whole group) and one ``d x d`` SVD per query
head, from the same tensors the Q, K, V and O items read (each read once per layer).

Why QR and not the Gram matrices the slice route uses: an ``R`` from the Cholesky factor of
``F^T F`` carries the Gram route's error ``eps * kappa(F)^2``. Householder QR is backward
stable (``R`` is exact for ``F + dF`` with ``||dF|| ~ eps ||F||``), so every singular value of
the product is off by about ``eps ||F_a|| ||F_b||`` at most, whatever the conditioning.

That is also why a product has its own measurement floor (:func:`product_floor`): its small
singular values are limited by the factors' norms, not by its own largest value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pytest_spectral.checkpoints.checkpoint import CIRCUITS
from pytest_spectral.compute.spectra import head_blocks
from pytest_spectral.judging.metrics import storage_roundoff
from pytest_spectral.results import SliceSpectra

if TYPE_CHECKING:
    from pytest_spectral.checkpoints.checkpoint import Checkpoint
    from pytest_spectral.checkpoints.reader import WeightReader

_EPS64 = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class CircuitFactors:
    """One side of a layer's circuits, as read: ``hidden x head_dim`` factors, one per slice
    (``[slices, hidden, d]``, views of the stored tensor), and their storage's unit roundoff."""

    factors: torch.Tensor
    roundoff: float


def read_circuit_factors(
    reader: WeightReader, checkpoint: Checkpoint, layer: int, circuit: str
) -> tuple[CircuitFactors, CircuitFactors]:
    """The two factors of ``circuit`` (``qk`` or ``ov``) for every slice of ``layer``: the
    query side (Q or O, per query head) and the K/V side (per K/V head).

    Reading happens on the engine's thread; :func:`circuit_spectra` may run on another.
    """
    geometry, layout = checkpoint.geometry_at(layer), checkpoint.layout_at(layer)
    sides = []
    for matrix in CIRCUITS[circuit]:
        source = checkpoint.tensors[(layer, matrix)]
        blocks = head_blocks(reader.tensor(source), matrix, geometry, layout)
        # [slices, hidden, d]: W^T of a Q, K or V slice (nn.Linear rows), W of an O slice.
        factors = blocks.transpose(1, 2) if (matrix == "o") == layout.conv1d else blocks
        sides.append(CircuitFactors(factors, storage_roundoff(source.dtype)))
    return sides[0], sides[1]


def circuit_spectra(
    left: CircuitFactors,
    right: CircuitFactors,
    kv_head_of: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> SliceSpectra:
    """The singular values of the circuits ``F_a[h] F_b[kv_head_of[h]]^T``, one per query head.

    Returns one row per query head, ``min(hidden, head_dim)`` values each (the product's rank
    is at most ``head_dim``; its other singular values are 0), with ``floor`` set per head.
    A head whose factor slices hold NaN/Inf gets ``nan`` values and their count.

    Each ``R`` is scaled by an exact power of two (its spectral norm's binary exponent) before
    the ``d x d`` core is formed, and the core's singular values scaled back in float64: the
    core of factors near 1e-170 or 1e300 neither underflows nor overflows, and no value
    changes by more than the rounding it would have had anyway.
    """
    device = torch.device(device)
    a, b = _triangles(left.factors, device, dtype), _triangles(right.factors, device, dtype)
    shared = np.asarray(kv_head_of, dtype=np.int64)
    a_exp, b_exp = _exponents(a.norms[:, 0]), _exponents(b.norms[:, 0])
    a_scaled = a.triangles * _powers_of_two(-a_exp, a.triangles)
    b_scaled = (b.triangles * _powers_of_two(-b_exp, b.triangles))[torch.from_numpy(shared)]
    cores = a_scaled @ b_scaled.transpose(1, 2)
    values = torch.full(cores.shape[:2], float("nan"), dtype=torch.float64)
    finite = torch.isfinite(cores).flatten(1).all(1).cpu()
    if bool(finite.any()):
        kwargs = {"driver": "gesvd"} if device.type == "cuda" else {}
        selected = cores[finite.to(cores.device)]
        values[finite] = torch.linalg.svdvals(selected, **kwargs).cpu().to(torch.float64)
    scaled_back = np.ldexp(values.numpy(), (a_exp + b_exp[shared])[:, None])
    nonfinite = [a.nonfinite[h] + b.nonfinite[g] for h, g in enumerate(shared.tolist())]
    rows, inner = left.factors.shape[1], left.factors.shape[2]
    floor = product_floor(
        (a.norms[:, 0], a.norms[:, 1], left.roundoff),
        (b.norms[shared, 0], b.norms[shared, 1], right.roundoff),
        rows=rows,
        inner=inner,
    )
    method = "qr_core" if dtype == torch.float64 else "qr_core32"
    return SliceSpectra(scaled_back, nonfinite, [method] * len(nonfinite), floor=floor)


def _exponents(norms: np.ndarray) -> np.ndarray:
    """Each norm's binary exponent (0 where it is zero or not finite)."""
    usable = np.isfinite(norms) & (norms > 0)
    return np.where(usable, np.frexp(np.where(usable, norms, 1.0))[1], 0).astype(np.int64)


def _powers_of_two(exponents: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``2**exponents`` shaped to scale ``like``'s slices, exact in float64 and float32
    (the exponents of norms stay within float32's range after a float32 QR)."""
    scale = np.ldexp(1.0, exponents).reshape(-1, 1, 1)
    return torch.from_numpy(scale).to(device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class _Triangles:
    """The ``R`` factor of each slice's thin QR, with its non-finite count and its spectral
    and Frobenius norms (``nan`` rows where the slice holds NaN/Inf)."""

    triangles: torch.Tensor  # [slices, min(n, d), d]
    nonfinite: list[int]
    norms: np.ndarray  # [slices, 2] float64: ||F||_2, ||F||_F


def _triangles(factors: torch.Tensor, device: torch.device, dtype: torch.dtype) -> _Triangles:
    """Thin QR of each ``factors[i]`` (``n x d``): only ``R`` is kept (``mode="r"``).

    On the CPU each slice is upcast into one reused buffer (no layer-sized float64 copy); on
    an accelerator the batch is moved and factorised at once.
    """
    count, n, d = factors.shape
    triangles = torch.full((count, min(n, d), d), float("nan"), dtype=dtype, device=device)
    nonfinite = [0] * count
    if device.type == "cpu":
        buffer = torch.empty(n, d, dtype=dtype)
        for i in range(count):
            buffer.copy_(factors[i])
            nonfinite[i] = int((~torch.isfinite(buffer)).sum())
            if nonfinite[i] == 0:
                triangles[i] = torch.linalg.qr(buffer, mode="r").R
    else:
        batch = factors.to(device).to(dtype)
        counts = (~torch.isfinite(batch)).flatten(1).sum(1)
        finite = counts == 0
        nonfinite = counts.cpu().tolist()
        if bool(finite.any()):
            triangles[finite] = torch.linalg.qr(batch[finite], mode="r").R
    norms = np.full((count, 2), np.nan)
    finite_rows = [i for i in range(count) if nonfinite[i] == 0]
    if finite_rows:
        exact = triangles[finite_rows].to(torch.float64)
        norms[finite_rows, 0] = torch.linalg.matrix_norm(exact, ord=2).cpu().numpy()
        norms[finite_rows, 1] = torch.linalg.matrix_norm(exact).cpu().numpy()
    return _Triangles(triangles, nonfinite, norms)


def product_floor(
    left: tuple[np.ndarray, np.ndarray, float],
    right: tuple[np.ndarray, np.ndarray, float],
    *,
    rows: int,
    inner: int,
) -> np.ndarray:
    """The measurement floor of products ``F_a F_b^T`` of ``rows x inner`` factors, per product.

    ``left`` and ``right`` give each factor's spectral norms, Frobenius norms and the unit
    roundoff of its storage dtype. A singular value of the product below the larger of

    - the float64 floor ``||F_a||_2 ||F_b||_2 max(rows, inner) eps64`` (what rounding in any
      float64 method, and in forming the product explicitly, leaves: it scales with the
      factors' norms, which may be far above the product's own largest value when the two
      factors barely overlap), and
    - the storage floor ``u_a rms(F_a) (sqrt(rows) + sqrt(inner)) ||F_b||_2 + u_b ||F_a||_2
      rms(F_b) (sqrt(rows) + sqrt(inner))``: rounding each factor to its dtype adds noise of
      spectral norm about ``u rms(F) (sqrt(m) + sqrt(n))`` (as for a slice, see
      :func:`pytest_spectral.judging.metrics.measurement_floor`), which reaches the product
      multiplied by the other factor (first order)

    cannot be told apart from rounding.
    """
    (a2, af, au), (b2, bf, bu) = left, right
    size = rows * inner
    spread = np.sqrt(rows) + np.sqrt(inner)
    numerical = a2 * b2 * max(rows, inner) * _EPS64
    storage = au * af / np.sqrt(size) * spread * b2 + bu * a2 * bf / np.sqrt(size) * spread
    return np.maximum(numerical, storage)
