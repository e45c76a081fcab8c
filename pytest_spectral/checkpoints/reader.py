"""Reading checkpoint tensors: plain reads into fresh buffers, from verified files.

Each tensor is read once, with ``pread`` into a buffer of its own (see
:func:`pytest_spectral.untrusted.read_verified`): the file is checked to be the one collected
(device, inode, size, mtime and ctime, on the descriptor read, before and after), and a file
truncated under the run is a short read that fails its items instead of a ``SIGBUS`` (which a
memory map would turn it into, killing the interpreter). safetensors and ``torch.save``
tensors are read the same way, at the offsets their headers gave at collection.

A tensor is held until :meth:`WeightReader.release`: the engine releases a layer's tensors once
the layer is computed, so a fused Q/K/V tensor serving three units is read once, and a run
holds about one layer however large the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pytest_spectral.checkpoints.safetensors_header import TensorEntry
from pytest_spectral.untrusted import read_verified

TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class WeightReader:
    def __init__(self) -> None:
        self._held: dict[tuple[Path, int], torch.Tensor] = {}

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor as stored, in a buffer of its own (read on first use, then held).

        Raises :class:`~pytest_spectral.untrusted.FileChangedError` when the file is no longer
        the one collected.
        """
        key = (entry.file, entry.offset)
        held = self._held.get(key)
        if held is None:
            raw = torch.empty(entry.nbytes, dtype=torch.uint8)
            read_verified(entry.file, entry.identity, [(entry.offset, memoryview(raw.numpy()))])
            held = raw.view(TORCH_DTYPES[entry.dtype]).view(entry.shape)
            self._held[key] = held
        return held

    def release(self, entry: TensorEntry) -> None:
        """Drop the tensor once its layer is done (it is read again if asked for again)."""
        self._held.pop((entry.file, entry.offset), None)
