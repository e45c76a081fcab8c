"""On-disk cache of per-(layer, matrix) singular values, so re-runs cost only pytest's time.

Thresholds change far more often than checkpoints, so singular values are cached (in pytest's
cache directory) with the built-in metrics computed from them; metrics added by conftests, or
parameter variants not cached yet, are computed from the cached singular values.

The guarantee: an entry is used only if all of these match what was stored —
the file's resolved path, size, modification time (ns) and inode; the SHA-256 of the file's
whole safetensors header (every tensor's name, dtype, shape and offsets); the tensor's name,
dtype, shape and offsets; the head layout; the decomposition precision; and a BLAKE2 digest
of 17 evenly spaced 4 KiB samples of the tensor's bytes. Any ordinary rewrite of a file
changes its mtime (and usually its inode), so it is recomputed. A rewrite that keeps size,
mtime, inode and header and changes no sampled byte would go unnoticed: use
``--spectral-no-cache`` (or ``--cache-clear``) for files edited in place by such tools.

Entries are written to a temporary file and renamed, so concurrent pytest-xdist workers can
never leave a half-written entry; an unreadable or inconsistent entry is deleted and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pytest_spectral.checkpoints.safetensors_header import TensorEntry
from pytest_spectral.results import SliceSpectra

#: Bump when the meaning of a cached value changes (method, layout, format).
FORMAT_VERSION = 2
_METRIC = "metric:"


def entry_key(entry: TensorEntry, layout: tuple[object, ...], precision: str) -> str:
    """The cache key of one (layer, matrix): see the module docstring for what it covers."""
    stat = entry.file.stat()
    material = {
        "format": FORMAT_VERSION,
        "file": str(entry.file.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "header": entry.header_sha256,
        "tensor": [entry.name, entry.dtype, list(entry.shape), entry.offset, entry.nbytes],
        "sample": hashlib.blake2b(sample_bytes(entry), digest_size=16).hexdigest(),
        "layout": list(layout),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def sample_bytes(entry: TensorEntry, blocks: int = 16, block_bytes: int = 4096) -> bytes:
    """Evenly spaced pieces of a tensor's bytes (and its last 4 KiB): a cheap content check.

    Plain reads: checking the cache needs neither torch nor the whole tensor.
    """
    first = max(entry.offset, 0)  # a torch.save file is sampled whole
    stride = max(1, entry.nbytes // blocks)
    starts = [first + i * stride for i in range(blocks)]
    starts.append(first + max(0, entry.nbytes - block_bytes))
    end = first + entry.nbytes
    pieces = []
    with entry.file.open("rb") as handle:
        for start in starts:
            handle.seek(start)
            pieces.append(handle.read(max(0, min(block_bytes, end - start))))
    return b"".join(pieces)


class SpectraCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / f"{key[:40]}.npz"

    def load(self, key: str) -> SliceSpectra | None:
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                values = np.array(data["values"])
                nonfinite = data["nonfinite"].tolist()
                methods = [str(m) for m in data["methods"]]
                stored_key = str(data["key"])
                checksum = str(data["checksum"])
                metrics = {
                    name.removeprefix(_METRIC): np.array(data[name])
                    for name in data.files
                    if name.startswith(_METRIC)
                }
        except FileNotFoundError:
            return None
        except Exception:  # any corruption: never trust it, recompute
            _discard(path)
            return None
        consistent = (
            stored_key == key
            and checksum == _checksum(values, metrics)
            and values.ndim == 2
            and len(nonfinite) == len(methods) == values.shape[0]
        )
        if not consistent:
            _discard(path)
            return None
        return SliceSpectra(values, nonfinite, methods, metrics)

    def store(self, key: str, spectra: SliceSpectra) -> None:
        values = spectra.singular_values
        buffer = io.BytesIO()
        np.savez(
            buffer,
            values=values,
            nonfinite=np.asarray(spectra.nonfinite, dtype=np.int64),
            methods=np.asarray(spectra.methods, dtype=str),
            key=np.asarray(key),
            checksum=np.asarray(_checksum(values, spectra.metrics)),
            **{_METRIC + name: column for name, column in spectra.metrics.items()},
        )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        except OSError:
            return  # a cache that cannot be written is no cache
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(buffer.getvalue())
            os.replace(temporary, self._path(key))
        except OSError:
            Path(temporary).unlink(missing_ok=True)


def _discard(path: Path) -> None:
    """Remove an entry that cannot be trusted, if the cache lets us."""
    with contextlib.suppress(OSError):
        path.unlink()


def _checksum(values: np.ndarray, metrics: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    for name in sorted(metrics):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(metrics[name], dtype=np.float64).tobytes())
    return digest.hexdigest()
