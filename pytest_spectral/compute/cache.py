"""On-disk cache of per-(layer, matrix) singular values, so re-runs cost only pytest's time.

Thresholds change far more often than checkpoints, so singular values are cached (in pytest's
cache directory) with the built-in metrics computed from them; metrics added by conftests, or
parameter variants not cached yet, are computed from the cached singular values.

The guarantee: an entry is used only if all of these match what was stored —
the file's resolved path and its identity as collected (device, inode, size, modification
time and status-change time, both in ns); the SHA-256 of the file's whole header (every
tensor's name, dtype, shape and offsets); the tensor's name, dtype, shape and offsets; the head
layout; the decomposition precision; and a BLAKE2 digest of 17 evenly spaced 4 KiB samples of
the tensor's bytes, read from the file after checking it is still the one collected (or the
items fail as changed after collection). An in-place rewrite that restores size and mtime still
changes the ctime, which no unprivileged program can set back; only someone who can reset the
clock, or write the cache directory itself, can make a stale entry match. Use
``--spectral-no-cache`` (or ``--cache-clear``) when that is a concern.

Entries are written to a temporary file and renamed, so concurrent pytest-xdist workers can
never leave a half-written entry; an unreadable or inconsistent entry is deleted and recomputed.
"""

from __future__ import annotations

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
from pytest_spectral.untrusted import read_verified

#: Bump when the meaning of a cached value changes (method, layout, format).
FORMAT_VERSION = 3
_METRIC = "metric:"


def entry_key(entry: TensorEntry, layout: tuple[object, ...], precision: str) -> str:
    """The cache key of one (layer, matrix): see the module docstring for what it covers.

    Raises :class:`~pytest_spectral.untrusted.FileChangedError` when the file is no longer the
    one collected.
    """
    identity = entry.identity
    material = {
        "format": FORMAT_VERSION,
        "file": str(entry.file.resolve()),
        "identity": [
            identity.device,
            identity.inode,
            identity.size,
            identity.mtime_ns,
            identity.ctime_ns,
        ],
        "header": entry.header_sha256,
        "tensor": [entry.name, entry.dtype, list(entry.shape), entry.offset, entry.nbytes],
        "sample": hashlib.blake2b(sample_bytes(entry), digest_size=16).hexdigest(),
        "layout": list(layout),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def sample_bytes(entry: TensorEntry, blocks: int = 16, block_bytes: int = 4096) -> bytes:
    """Evenly spaced pieces of a tensor's bytes (and its last 4 KiB): a cheap content check.

    Plain verified reads: checking the cache needs neither torch nor the whole tensor.
    """
    stride = max(1, entry.nbytes // blocks)
    starts = [i * stride for i in range(blocks)]
    starts.append(max(0, entry.nbytes - block_bytes))
    buffers = [bytearray(max(0, min(block_bytes, entry.nbytes - start))) for start in starts]
    read_verified(
        entry.file,
        entry.identity,
        [(entry.offset + start, memoryview(b)) for start, b in zip(starts, buffers, strict=True)],
    )
    return b"".join(buffers)


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
            path.unlink(missing_ok=True)
            return None
        consistent = (
            stored_key == key
            and checksum == _checksum(values, metrics)
            and values.ndim == 2
            and len(nonfinite) == len(methods) == values.shape[0]
        )
        if not consistent:
            path.unlink(missing_ok=True)
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
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(buffer.getvalue())
            os.replace(temporary, self._path(key))
        except OSError:
            Path(temporary).unlink(missing_ok=True)  # a cache that cannot be written is no cache


def _checksum(values: np.ndarray, metrics: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    for name in sorted(metrics):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(metrics[name], dtype=np.float64).tobytes())
    return digest.hexdigest()
