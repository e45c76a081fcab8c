"""Zero-copy, read-only access to checkpoint tensors.

Each file is memory-mapped once with ``ACCESS_READ``: the checkpoint can never be modified
through it, the page cache is shared with other pytest-xdist workers, and a tensor costs no
allocation until a slice of it is upcast.
"""

from __future__ import annotations

import mmap
import warnings
from pathlib import Path

import torch

from pytest_spectral.checkpoints.safetensors_header import TensorEntry

TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` state dict, memory-mapped: tensors are read only when touched.

    ``weights_only`` refuses pickled code, so a hostile ``.bin`` cannot run anything.
    """
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"expected a dict of tensors, got {type(state).__name__}")
    return state.get("state_dict", state) if "state_dict" in state else state


class WeightReader:
    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self._torch_files: dict[Path, dict[str, torch.Tensor]] = {}

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor as stored, backed by the file's pages (do not write to it)."""
        if entry.offset < 0:  # a torch.save file
            if entry.file not in self._torch_files:
                self._torch_files[entry.file] = load_torch_file(entry.file)
            return self._torch_files[entry.file][entry.name]
        dtype = TORCH_DTYPES[entry.dtype]
        with warnings.catch_warnings():
            # The map is read-only on purpose; torch warns that it cannot write to it.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._map(entry.file),
                dtype=dtype,
                count=entry.nbytes // dtype.itemsize,
                offset=entry.offset,
            )
        return flat.view(entry.shape)

    def release(self, entry: TensorEntry) -> None:
        """Drop the tensor's pages from this process once its layer is done.

        They stay in the page cache, but no longer count in the process's resident memory, so
        a whole run holds about one layer however large the checkpoint.
        """
        mapping = self._maps.get(entry.file)
        if mapping is None or entry.offset < 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = entry.offset - entry.offset % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, start, entry.offset + entry.nbytes - start)

    def _map(self, path: Path) -> mmap.mmap:
        mapping = self._maps.get(path)
        if mapping is None:
            with path.open("rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = mapping
        return mapping
