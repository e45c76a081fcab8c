"""Reading safetensors headers without torch and without trusting them.

Collection needs shapes, dtypes and byte offsets of a few hundred tensors; parsing the JSON
header directly gives them in microseconds, never touches the weights, and lets every claim
of the header be checked against the real file size before anything is allocated.

Format: an 8-byte little-endian header length N, N bytes of JSON, then the data section.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.checkpoints.formats.sources import ELEMENT_SIZES, StoredTensor
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import (
    FileIdentity,
    MiB,
    UntrustedFileError,
    open_regular,
    read_at,
)

#: A header larger than this is refused before it is read. Real ones hold about 120 bytes per
#: tensor: a 5 GB shard of the largest mixtures of experts stays under 1 MiB.
MAX_HEADER_BYTES = 16 * MiB


@dataclass(frozen=True)
class WeightFile:
    """One weight file as collected: what it is, how large its header was, and its tensors."""

    path: Path
    identity: FileIdentity
    header_bytes: int
    entries: dict[str, StoredTensor]


def read_header(
    path: Path, limit: int = MAX_HEADER_BYTES, wanted: Callable[[str], bool] | None = None
) -> WeightFile:
    """Parse and validate the header of ``path``; errors name the file and what is wrong.

    A header over ``limit`` bytes is refused before it is read (a checkpoint passes what is
    left of its total budget, see ``shards.MAX_TOTAL_HEADER_BYTES``). Every entry is
    validated, but only those whose names ``wanted`` accepts (all by default) are kept. A
    dtype this plugin does not know (a newer float8 or float4 variant) is accepted unchecked:
    its tensor says so only if a run reads it.
    """
    try:
        with open_regular(path) as (descriptor, status):
            size = status.st_size
            prefix = read_at(descriptor, 0, 8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short to be safetensors "
                    "(truncated download? fetch the file again)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > limit:
                budget = (
                    "any real safetensors header stays under"
                    if limit >= MAX_HEADER_BYTES
                    else "left of the budget for all of the checkpoint's headers together"
                )
                raise CheckpointError(
                    f"{path}: header claims {header_len} bytes, over the {_mib(limit)} MiB "
                    f"{budget} (corrupt or hostile file); refused before reading it"
                )
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: header claims {header_len} bytes but the file has {size - 8} "
                    "after the length prefix (truncated or not a safetensors file)"
                )
            raw = read_at(descriptor, 8, header_len)
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{path}: header nested too deeply to parse") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    identity = FileIdentity.of(status)
    data_start = 8 + header_len
    data_size = size - data_start
    digest = hashlib.sha256(raw).hexdigest()
    entries = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end, problem = _validated(path, name, info, data_size)
        if end > begin:
            spans.append((begin, end, name))
        if wanted is None or wanted(name):
            entries[name] = StoredTensor(
                path, name, dtype, shape, data_start + begin, end - begin, digest, identity, problem
            )
    check_no_overlap(path, spans)
    return WeightFile(path, identity, header_len, entries)


def _mib(size: int) -> str:
    return f"{size / MiB:.3g}"


def check_no_overlap(path: Path, spans: list[tuple[int, int, str]]) -> None:
    """Refuse tensors whose byte ranges ``(begin, end, name)`` overlap."""
    spans.sort()
    for (_, previous_end, previous), (begin, _, name) in itertools.pairwise(spans):
        if begin < previous_end:
            raise CheckpointError(
                f"{path}: tensors {previous!r} and {name!r} overlap in the data section "
                "(corrupt file)"
            )


def _validated(
    path: Path, name: str, info: object, data_size: int
) -> tuple[str, tuple[int, ...], int, int, str]:
    """``(dtype, shape, begin, end, problem)`` of one header entry, every claim checked
    against the file's real data section (``type(x) is int`` also refuses JSON booleans);
    ``problem`` says why a tensor of an unknown dtype cannot be read."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not dtype or len(dtype) > 32:
        raise CheckpointError(f"{where}: dtype {dtype!r:.40} is not a dtype name")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(
            f"{where}: shape {shape!r:.80} is not a list of non-negative integers"
        )
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or type(offsets[0]) is not int
        or type(offsets[1]) is not int
    ):
        raise CheckpointError(f"{where}: data_offsets {offsets!r:.80} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the {data_size}-byte data section "
            "(truncated or corrupt file)"
        )
    element_size = ELEMENT_SIZES.get(dtype)
    if element_size is None:
        return dtype, tuple(shape), begin, end, f"has dtype {dtype!r}, unknown to this plugin"
    expected = math.prod(shape) * element_size
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: {end - begin} bytes stored but shape {shape!r:.80} of {dtype} needs "
            f"{expected:g}"
        )
    return dtype, tuple(shape), begin, end, ""
