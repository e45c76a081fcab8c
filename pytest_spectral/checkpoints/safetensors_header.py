"""Reading safetensors headers without torch and without trusting them.

Collection needs shapes, dtypes and byte offsets of a few hundred tensors; parsing the JSON
header directly gives them in microseconds, never touches the weights, and lets every claim
of the header be checked against the real file size before anything is allocated.

Format: an 8-byte little-endian header length N, N bytes of JSON, then the data section.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.errors import CheckpointError

#: Bytes per element of the dtypes whose spectra can be computed.
DTYPE_SIZES: dict[str, int] = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
_KNOWN_DTYPE_SIZES: dict[str, float] = {
    **DTYPE_SIZES,
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}
#: Headers larger than this are refused before being read (real ones are well under 10 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    #: absolute byte offset of the first element; -1 for a tensor in a torch.save file,
    #: whose ``nbytes`` is then the whole file's size
    offset: int
    nbytes: int
    header_sha256: str  # of the whole JSON header: changes when any tensor moves or is added


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate the header of ``path``; errors name the file and what is wrong."""
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short to be safetensors "
                    "(truncated download? fetch the file again)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header claims {header_len} bytes, over the "
                    f"{MAX_HEADER_BYTES // 2**20} MiB any real safetensors header stays under "
                    "(corrupt or hostile file); refused before reading it"
                )
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: header claims {header_len} bytes but the file has {size - 8} "
                    "after the "
                    "length prefix (truncated or not a safetensors file)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    digest = hashlib.sha256(raw).hexdigest()
    entries = {
        name: _entry(path, name, info, data_start, data_size, digest)
        for name, info in header.items()
        if name != "__metadata__"
    }
    _check_no_overlap(path, entries.values())
    return entries


def _check_no_overlap(path: Path, entries: Iterable[TensorEntry]) -> None:
    previous: TensorEntry | None = None
    for entry in sorted((e for e in entries if e.nbytes), key=lambda e: e.offset):
        if previous is not None and entry.offset < previous.offset + previous.nbytes:
            raise CheckpointError(
                f"{path}: tensors {previous.name!r} and {entry.name!r} overlap in the data "
                "section (corrupt file)"
            )
        previous = entry


def _entry(
    path: Path, name: str, info: object, data_start: int, data_size: int, digest: str
) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _KNOWN_DTYPE_SIZES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the {data_size}-byte data section "
            "(truncated or corrupt file)"
        )
    expected = math.prod(shape) * _KNOWN_DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: {end - begin} bytes stored but shape {shape} of {dtype} needs {expected:g}"
        )
    return TensorEntry(path, name, dtype, tuple(shape), data_start + begin, end - begin, digest)
