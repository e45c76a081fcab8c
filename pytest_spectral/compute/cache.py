"""On-disk cache of per-(layer, matrix) singular values, so re-runs cost only pytest's time.

Thresholds change far more often than checkpoints, so singular values are cached (in pytest's
cache directory) with the built-in metrics computed from them; metrics added by conftests, or
parameter variants not cached yet, are computed from the cached singular values.

The guarantee: an entry is used only if all of these match what was stored —
for every file the tensor is produced from (one, or several for a LoRA merge or a tensor saved
in chunks): its resolved path and identity as collected (device, inode, size, modification
time and status-change time, both in ns), the SHA-256 of its whole header (every tensor's
name, dtype, shape and offsets), the tensor's name, dtype, shape and offsets, and a BLAKE2
digest of 17 evenly spaced 4 KiB samples of its bytes, read after checking the file is still
the one collected (or the items fail as changed after collection); how the tensor is produced
from them (dequantization type, row order, merge scale...); the head layout; and the
decomposition precision. An in-place rewrite that restores size and mtime still
changes the ctime, which no unprivileged program can set back; only someone who can reset the
clock, or write the cache directory itself, can make a stale entry match. Use
``--spectral-no-cache`` (or ``--cache-clear``) when that is a concern.

An entry is one ``.npz`` file with few members (the metric columns stacked into one array,
their names in another): each member costs a zip lookup and a header parse, and a re-run
loads every entry of the model.

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

from pytest_spectral.checkpoints.formats.sources import TensorSource
from pytest_spectral.results import SliceSpectra

#: Bump when the meaning of a cached value changes (method, layout, format).
FORMAT_VERSION = 5
_FLOOR = "floor"


def entry_key(entry: TensorSource, layout: tuple[object, ...], precision: str) -> str:
    """The cache key of one (layer, matrix): see the module docstring for what it covers.

    Raises :class:`~pytest_spectral.untrusted.FileChangedError` when a file is no longer the
    one collected.
    """
    material = {
        "format": FORMAT_VERSION,
        "source": entry.cache_material(),
        "layout": list(layout),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


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
                names = [str(name) for name in data["metric_names"]]
                columns = np.array(data["metrics"])
                floor = np.array(data[_FLOOR]) if _FLOOR in data.files else None
        except FileNotFoundError:
            return None
        except Exception:  # any corruption: never trust it, recompute
            _discard(path)
            return None
        consistent = (
            stored_key == key
            and values.ndim == 2
            and columns.dtype == np.float64
            and columns.shape == (len(names), values.shape[0])
            and len(set(names)) == len(names)
            and len(nonfinite) == len(methods) == values.shape[0]
            and (floor is None or floor.shape == values.shape[:1])
        )
        metrics = dict(zip(names, columns, strict=True)) if consistent else {}
        if not consistent or checksum != _checksum(values, metrics, floor):
            _discard(path)
            return None
        return SliceSpectra(values, nonfinite, methods, metrics, floor)

    def store(self, key: str, spectra: SliceSpectra) -> None:
        values = spectra.singular_values
        buffer = io.BytesIO()
        np.savez(
            buffer,
            values=values,
            nonfinite=np.asarray(spectra.nonfinite, dtype=np.int64),
            methods=np.asarray(spectra.methods, dtype=str),
            key=np.asarray(key),
            checksum=np.asarray(_checksum(values, spectra.metrics, spectra.floor)),
            metric_names=np.asarray(list(spectra.metrics), dtype=str),
            metrics=np.asarray(list(spectra.metrics.values()), dtype=np.float64).reshape(
                len(spectra.metrics), values.shape[0]
            ),
            **({} if spectra.floor is None else {_FLOOR: spectra.floor}),
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


def _checksum(
    values: np.ndarray, metrics: Mapping[str, np.ndarray], floor: np.ndarray | None = None
) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    for name in sorted(metrics):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(metrics[name], dtype=np.float64).tobytes())
    if floor is not None:  # a circuit's (only those have one: other entries are unchanged)
        digest.update(_FLOOR.encode())
        digest.update(np.ascontiguousarray(floor, dtype=np.float64).tobytes())
    return digest.hexdigest()
