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


def circuit_spectra(
    reader: WeightReader,
    checkpoint: Checkpoint,
    layer: int,
    circuit: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> SliceSpectra:
    """The singular values of ``circuit`` (``qk`` or ``ov``) for every query head of ``layer``.

    Returns one row per query head, ``min(hidden, head_dim)`` values each (the product's rank
    is at most ``head_dim``; its other singular values are 0), with ``floor`` set per head.
    A head whose factor slices hold NaN/Inf gets ``nan`` values and their count.
    """
    device = torch.device(device)
    geometry, layout = checkpoint.geometry, checkpoint.layout
    sides = []
    for matrix in CIRCUITS[circuit]:
        source = checkpoint.tensors[(layer, matrix)]
        blocks = head_blocks(reader.tensor(source), matrix, geometry, layout)
        # [slices, hidden, d]: W^T of a Q, K or V slice (nn.Linear rows), W of an O slice.
        factors = blocks.transpose(1, 2) if (matrix == "o") == layout.conv1d else blocks
        sides.append((_triangles(factors, device, dtype), storage_roundoff(source.dtype)))
    (left, left_u), (right, right_u) = sides
    # The left factor is per query head; the right (K or V) per K/V head, shared by its group.
    shared = np.array([geometry.kv_head_of(h) for h in range(geometry.heads)])
    index = torch.from_numpy(shared).to(right.triangles.device)
    cores = left.triangles @ right.triangles[index].transpose(1, 2)
    values = torch.full(cores.shape[:2], float("nan"), dtype=torch.float64)
    finite = torch.isfinite(cores).flatten(1).all(1).cpu()
    if bool(finite.any()):
        kwargs = {"driver": "gesvd"} if device.type == "cuda" else {}
        selected = cores[finite.to(cores.device)]
        values[finite] = torch.linalg.svdvals(selected, **kwargs).cpu().to(torch.float64)
    nonfinite = [left.nonfinite[h] + right.nonfinite[g] for h, g in enumerate(shared.tolist())]
    n, d = geometry.hidden, geometry.head_dim
    floor = product_floor(
        (left.norms[:, 0], left.norms[:, 1], left_u),
        (right.norms[shared, 0], right.norms[shared, 1], right_u),
        rows=n,
        inner=d,
    )
    method = "qr" if dtype == torch.float64 else "qr32"
    return SliceSpectra(values.numpy(), nonfinite, [method] * len(nonfinite), floor=floor)


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
