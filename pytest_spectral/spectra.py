"""Singular values of every head slice, computed per (layer, matrix) in one batch.

Why a Gram matrix and not an SVD per head: a head slice is ``d x hidden`` (128 x 4096 for
Llama-3-8B), and ``eigvalsh`` of its ``d x d`` Gram matrix in float64 is about ten times
cheaper than ``svdvals`` of the slice. The Gram route squares the condition number, so its
relative error on a singular value is about ``eps64 * kappa^2``; every head whose computed
condition number makes that exceed :data:`TARGET_RELATIVE_ERROR` is recomputed with a direct
float64 SVD, whose error is ``eps64 * kappa``. The result is certified, not hoped for:
relative error within 1e-9 of LAPACK float64 for condition numbers up to 1e6 and beyond.

Each slice is upcast into one reused float64 buffer straight from the memory-mapped file, so
a weight is read once and at most one layer's spectra are ever held.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pytest_spectral.checkpoint import Checkpoint, Geometry
from pytest_spectral.metrics import MetricRequest
from pytest_spectral.safetensors_header import TensorEntry

_TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
#: Relative error on singular values that the Gram route must provably stay under.
TARGET_RELATIVE_ERROR = 1e-10
_EPS64 = float(torch.finfo(torch.float64).eps)
#: Measured error of the float64 Gram route is below 0.15 * eps * kappa^2 (see tests); a
#: constant of 1 leaves a margin of more than six on top of the 10x margin of the target.
_GRAM_ERROR_CONSTANT = 1.0
#: Accept the Gram result when lambda_min / lambda_max is at least this (kappa <~ 670).
_GRAM_TRUST_RATIO = _GRAM_ERROR_CONSTANT * _EPS64 / TARGET_RELATIVE_ERROR


def head_blocks(weight: torch.Tensor, matrix: str, geometry: Geometry) -> torch.Tensor:
    """View ``weight`` as ``[slices, head_dim, hidden]``, one block per distinct head.

    Q/K/V heads are row blocks ``[h*d:(h+1)*d, :]``. An O head is the column block
    ``[:, h*d:(h+1)*d]``; it is returned transposed, which leaves its singular values unchanged.
    """
    slices, d = geometry.distinct_heads(matrix), geometry.head_dim
    if matrix == "o":
        return weight.view(weight.shape[0], slices, d).permute(1, 2, 0)
    return weight.view(slices, d, weight.shape[1])


@dataclass(frozen=True)
class SliceSpectra:
    """Singular values of a batch of slices, with how each was obtained."""

    singular_values: torch.Tensor  # [slices, r], float64, descending; nan where non-finite
    nonfinite: list[int]  # non-finite weights per slice
    direct_svd: list[bool]  # True where the Gram result was not accurate enough


def slice_singular_values(blocks: torch.Tensor) -> SliceSpectra:
    """Singular values (float64, descending) of each ``blocks[i]``, accurate to ~1e-10 relative."""
    count, rows, cols = blocks.shape
    rank = min(rows, cols)
    gram = torch.empty(count, rank, rank, dtype=torch.float64)
    buffer = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(count):
        buffer.copy_(blocks[i])
        if rows <= cols:
            torch.mm(buffer, buffer.T, out=gram[i])
        else:
            torch.mm(buffer.T, buffer, out=gram[i])

    values = torch.full((count, rank), float("nan"), dtype=torch.float64)
    nonfinite = [0] * count
    direct = [False] * count
    finite = torch.isfinite(gram).flatten(1).all(1)
    if bool(finite.any()):
        eigen = torch.linalg.eigvalsh(gram[finite])  # ascending
        values[finite] = eigen.clamp_min(0).sqrt().flip(-1)
        trusted = eigen[:, 0] >= eigen[:, -1] * _GRAM_TRUST_RATIO
        for i, ok in zip(finite.nonzero().flatten().tolist(), trusted.tolist(), strict=True):
            if not ok:
                values[i] = torch.linalg.svdvals(blocks[i].to(torch.float64))
                direct[i] = True
    for i in (~finite).nonzero().flatten().tolist():
        block = blocks[i].to(torch.float64)
        nonfinite[i] = int((~torch.isfinite(block)).sum())
        if nonfinite[i] == 0:  # finite weights whose Gram overflowed float64
            values[i] = torch.linalg.svdvals(block)
            direct[i] = True
    return SliceSpectra(values, nonfinite, direct)


@dataclass(frozen=True)
class HeadSpectrum:
    """Everything an item needs about its slice: values, metrics and provenance."""

    singular_values: list[float]
    metrics: dict[str, float]
    nonfinite: int
    direct_svd: bool


class WeightReader:
    """Zero-copy, read-only access to tensors through one memory map per file."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        mapping = self._maps.get(entry.file)
        if mapping is None:
            with entry.file.open("rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[entry.file] = mapping
        dtype = _TORCH_DTYPES[entry.dtype]
        count = entry.nbytes // dtype.itemsize
        with warnings.catch_warnings():
            # The map is read-only on purpose; torch warns that it cannot write to it.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=entry.offset)
        return flat.view(entry.shape)


class SpectraEngine:
    """Serves per-head spectra, computing each (layer, matrix) once, for all its heads.

    Items run layer after layer, so only the current layer's results are kept.
    """

    def __init__(self, checkpoint: Checkpoint, requests: Sequence[MetricRequest]) -> None:
        self.checkpoint = checkpoint
        self.requests = tuple(requests)
        self._reader = WeightReader()
        self._results: dict[tuple[int, str], list[HeadSpectrum]] = {}

    def head(self, layer: int, matrix: str, head: int) -> HeadSpectrum:
        """The spectrum of query head ``head`` (its shared K/V head for k and v)."""
        key = (layer, matrix)
        if key not in self._results:
            for stale in [k for k in self._results if k[0] != layer]:
                del self._results[stale]
            self._results[key] = self._compute(layer, matrix)
        geometry = self.checkpoint.geometry
        index = geometry.kv_head_of(head) if matrix in ("k", "v") else head
        return self._results[key][index]

    def _compute(self, layer: int, matrix: str) -> list[HeadSpectrum]:
        weight = self._reader.tensor(self.checkpoint.tensors[(layer, matrix)])
        spectra = slice_singular_values(head_blocks(weight, matrix, self.checkpoint.geometry))
        values = spectra.singular_values
        metrics = {request.key: request.compute(values).tolist() for request in self.requests}
        return [
            HeadSpectrum(
                singular_values=row,
                metrics={key: column[i] for key, column in metrics.items()},
                nonfinite=spectra.nonfinite[i],
                direct_svd=spectra.direct_svd[i],
            )
            for i, row in enumerate(values.tolist())
        ]
