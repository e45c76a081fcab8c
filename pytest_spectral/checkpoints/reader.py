"""Reading checkpoint tensors: each produced once by its source, held until its layer is done.

Sources (:mod:`pytest_spectral.checkpoints.formats.sources`) read with ``pread`` into buffers
of their own (see :func:`pytest_spectral.untrusted.read_verified`): the file is checked to be
the one collected (device, inode, size, mtime and ctime, on the descriptor read, before and
after), and a file truncated under the run is a short read that fails its items instead of a
``SIGBUS`` (which a memory map would turn it into, killing the interpreter).

A tensor is held until :meth:`WeightReader.release`: the engine releases a layer's tensors once
the layer is computed, so a fused Q/K/V tensor serving three units is read once, and a run
holds about one layer however large the checkpoint.
"""

from __future__ import annotations

import torch

from pytest_spectral.checkpoints.formats.sources import TensorSource

TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class WeightReader:
    def __init__(self) -> None:
        self._held: dict[object, torch.Tensor] = {}

    def tensor(self, entry: TensorSource) -> torch.Tensor:
        """The tensor, in a buffer of its own (produced on first use, then held).

        Raises :class:`~pytest_spectral.untrusted.FileChangedError` when a file is no longer
        the one collected.
        """
        held = self._held.get(entry.key)
        if held is None:
            held = self._held[entry.key] = entry.load()
        return held

    def release(self, entry: TensorSource) -> None:
        """Drop the tensor once its layer is done (it is read again if asked for again)."""
        self._held.pop(entry.key, None)
