"""Singular values of every head slice, computed per (layer, matrix) in one batch.

Why a Gram matrix and not an SVD per head: a head slice is ``d x hidden`` (128 x 4096 for
Llama-3-8B), and ``eigvalsh`` of its ``d x d`` Gram matrix in float64 is about ten times
cheaper than ``svdvals`` of the slice. The Gram route squares the condition number, so its
relative error on a singular value is about ``eps64 * kappa^2``; every head whose computed
condition number makes that exceed :data:`TARGET_RELATIVE_ERROR` is recomputed with a direct
float64 SVD, whose error is ``eps64 * kappa``. The result is certified, not hoped for:
relative error within 1e-9 of LAPACK float64 for condition numbers up to 1e6 and beyond.

Each slice is upcast into one reused float64 buffer straight from the tensor as read, so
a weight is read once and at most one layer's spectra are ever held.
"""

from __future__ import annotations

import torch

from pytest_spectral.checkpoints.checkpoint import Geometry, Layout
from pytest_spectral.checkpoints.slices import fused_grid
from pytest_spectral.results import SliceSpectra

#: Relative error on singular values that the Gram route must provably stay under.
TARGET_RELATIVE_ERROR = 1e-10
_EPS64 = float(torch.finfo(torch.float64).eps)
#: Measured error of the float64 Gram route is below 0.15 * eps * kappa^2 (see tests); a
#: constant of 1 leaves a margin of more than six on top of the 10x margin of the target.
_GRAM_ERROR_CONSTANT = 1.0
#: Accept the Gram result when lambda_min / lambda_max is at least this (kappa <~ 670).
_GRAM_TRUST_RATIO = _GRAM_ERROR_CONSTANT * _EPS64 / TARGET_RELATIVE_ERROR


def head_blocks(
    weight: torch.Tensor, matrix: str, geometry: Geometry, layout: Layout
) -> torch.Tensor:
    """View the stored ``weight`` as a batch of head slices, one per distinct head.

    A Q/K/V head is ``head_dim`` rows of the projection in ``nn.Linear`` orientation, found
    through the family's fused layout (see :mod:`pytest_spectral.checkpoints.architectures`);
    an O head is ``head_dim`` columns of the output projection. Slices come back as
    ``[slices, d, in]`` or ``[slices, in, d]``, whichever keeps rows contiguous in memory
    (transposing a slice leaves its singular values unchanged, and a transposing copy upcasts
    2.5x slower). Only grouped (Falcon-40B-style) queries need a copy.
    """
    d = geometry.head_dim
    if matrix == "o":
        if layout.conv1d:  # stored [heads * d, hidden]: a head is a row block
            return weight.view(geometry.heads, d, weight.shape[1])
        return weight.view(weight.shape[0], geometry.heads, d).permute(1, 0, 2)
    groups, per_group, (start, stop) = fused_grid(matrix, geometry, layout.fused)
    if layout.conv1d:  # stored [in, rows]: a head is a column block
        grid = weight.view(weight.shape[0], groups, per_group, d)[:, :, start:stop]
        return grid.permute(1, 2, 0, 3).reshape(-1, weight.shape[0], d)
    grid = weight.view(groups, per_group, d, weight.shape[1])[:, start:stop]
    return grid.reshape(-1, d, weight.shape[1])


def whole_matrix(
    weight: torch.Tensor, matrix: str, geometry: Geometry, layout: Layout
) -> torch.Tensor:
    """The whole matrix for a matrix-scope item: the stored weight, or Q, K or V's share of a
    fused one (in whatever orientation is cheapest: singular values do not care)."""
    if matrix not in ("q", "k", "v") or not layout.fused:
        return weight
    blocks = head_blocks(weight, matrix, geometry, layout)
    if layout.conv1d:  # [slices, in, d] -> [in, slices * d]
        return blocks.permute(1, 0, 2).reshape(blocks.shape[1], -1)
    return blocks.reshape(-1, blocks.shape[2])


def slice_singular_values(
    blocks: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> SliceSpectra:
    """Singular values (float64 on the CPU, descending) of each ``blocks[i]``.

    With ``dtype=float64`` (the default) the values are certified to about 1e-10 relative.
    ``float32`` is for speed on accelerators: a direct float32 SVD, never a float32 Gram
    matrix (which would lose every singular value below ``sigma_max * 3e-4``).
    """
    device = torch.device(device)
    if dtype == torch.float32:
        return _direct_float32(blocks, device)
    gram = _gram_matrices(blocks, device)
    count, rank = gram.shape[0], gram.shape[-1]
    values = torch.full((count, rank), float("nan"), dtype=torch.float64)
    nonfinite = [0] * count
    methods = ["gram"] * count
    finite = torch.isfinite(gram).flatten(1).all(1).cpu()
    if bool(finite.any()):
        eigen = torch.linalg.eigvalsh(gram[finite.to(gram.device)]).cpu()  # ascending
        values[finite] = eigen.clamp_min(0).sqrt().flip(-1)
        trusted = eigen[:, 0] >= eigen[:, -1] * _GRAM_TRUST_RATIO
        for i, ok in zip(finite.nonzero().flatten().tolist(), trusted.tolist(), strict=True):
            if not ok:
                values[i] = _svdvals64(blocks[i], device)
                methods[i] = "svd"
    for i in (~finite).nonzero().flatten().tolist():
        nonfinite[i] = int((~torch.isfinite(blocks[i].to(torch.float64))).sum())
        if nonfinite[i] == 0:  # finite weights whose Gram overflowed float64
            values[i] = _svdvals64(blocks[i], device)
            methods[i] = "svd"
    return SliceSpectra(values.numpy(), nonfinite, methods)


def _gram_matrices(blocks: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float64 Gram matrices over the smaller side of each block.

    On the CPU each block is upcast into one reused buffer (cache-friendly, no large
    temporaries); on an accelerator the whole batch is moved and multiplied at once.
    """
    count, rows, cols = blocks.shape
    wide = rows <= cols
    if device.type != "cpu":
        batch = blocks.to(device).to(torch.float64)
        return batch @ batch.transpose(1, 2) if wide else batch.transpose(1, 2) @ batch
    rank = min(rows, cols)
    gram = torch.empty(count, rank, rank, dtype=torch.float64)
    buffer = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(count):
        buffer.copy_(blocks[i])
        if wide:
            torch.mm(buffer, buffer.T, out=gram[i])
        else:
            torch.mm(buffer.T, buffer, out=gram[i])
    return gram


def _svdvals64(block: torch.Tensor, device: torch.device) -> torch.Tensor:
    matrix = block.to(device).to(torch.float64)
    if device.type == "cuda":
        # The default CUDA driver (gesvdj) is iterative; gesvd is the accurate one.
        return torch.linalg.svdvals(matrix, driver="gesvd").cpu()
    return torch.linalg.svdvals(matrix).cpu()


def _direct_float32(blocks: torch.Tensor, device: torch.device) -> SliceSpectra:
    batch = blocks.to(device).to(torch.float32)
    finite = torch.isfinite(batch).flatten(1).all(1).cpu()
    count, rank = blocks.shape[0], min(blocks.shape[1:])
    values = torch.full((count, rank), float("nan"), dtype=torch.float64)
    nonfinite = [0] * count
    if bool(finite.any()):
        selected = batch[finite.to(batch.device)]
        kwargs = {"driver": "gesvd"} if device.type == "cuda" else {}
        values[finite] = torch.linalg.svdvals(selected, **kwargs).cpu().to(torch.float64)
    for i in (~finite).nonzero().flatten().tolist():
        nonfinite[i] = int((~torch.isfinite(batch[i])).sum())
    return SliceSpectra(values.numpy(), nonfinite, ["svd32"] * count)
