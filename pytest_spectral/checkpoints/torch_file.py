"""Reading ``torch.save`` files (``pytorch_model.bin``) without letting their pickle act.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl``, a pickle that describes the
tensors, and one uncompressed record per storage, ``<name>/data/<key>``. ``torch.load`` is not
used on them: it cannot say where a tensor's bytes lie without memory-mapping the file (and a
file truncated under a map is a ``SIGBUS`` that kills the interpreter), and its
``weights_only`` unpickler still lets a pickle build ``bytearray``, ``set`` or ``Counter``
objects of any size (a 1.4 KB file can ask for gigabytes). Instead, every step bounded:

1. the zip's end record, read directly: a central directory over
   :data:`MAX_DIRECTORY_BYTES` is refused before ``zipfile`` parses it;
2. the directory, with ``zipfile``: names unique, one ``data.pkl`` of at most
   :data:`MAX_PICKLE_BYTES`, every record stored uncompressed and inside the file,
   little-endian byte order;
3. the pickle, with a ``pickle.Unpickler`` whose ``find_class`` knows only the globals
   ``torch.save`` writes for tensors and storages (:data:`ALLOWED_GLOBALS`) and returns inert
   stand-ins for them: any other global refuses the file where the unpickler meets it, before
   anything is called. Storages are never loaded, only their keys noted.

The result is one :class:`TensorEntry` per tensor, at its bytes' offset in the file, read
like a safetensors tensor (plain reads, file identity verified). torch is not imported.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.checkpoints.safetensors_header import ELEMENT_SIZES, TensorEntry, WeightFile
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import (
    FileIdentity,
    MiB,
    UntrustedFileError,
    open_regular,
    read_at,
)

#: The pickle of a state dict takes about 100 bytes per tensor: room for some 20,000.
MAX_PICKLE_BYTES = 2 * MiB
#: The zip directory takes about 100 bytes per record (one per storage).
MAX_DIRECTORY_BYTES = 4 * MiB

#: ``torch.<X>Storage`` classes (written by ``_rebuild_tensor_v2``) -> safetensors dtype names.
_STORAGE_DTYPES = {
    "BFloat16Storage": "BF16",
    "HalfStorage": "F16",
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
#: ``torch.<dtype>`` objects (written with ``_rebuild_tensor_v3`` for dtypes without a
#: storage class of their own, e.g. float8) -> safetensors dtype names.
_TORCH_DTYPES = {
    "bfloat16": "BF16",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int8": "I8",
    "uint8": "U8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "bool": "BOOL",
}
_END_RECORD = struct.Struct(zipfile.structEndArchive)
_END_RECORD_64 = struct.Struct(zipfile.structEndArchive64)
_END_LOCATOR_64 = struct.Struct(zipfile.structEndArchive64Locator)
_LOCAL_HEADER = struct.Struct(zipfile.structFileHeader)


@dataclass(frozen=True)
class _Dtype:
    """A storage class or dtype global, as a safetensors dtype name."""

    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    dtype: str
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise TypeError("a tensor without a storage")
    return _tensor(storage, storage.dtype, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: object,
    storage_offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> _Tensor:
    if not isinstance(storage, _Storage) or not isinstance(dtype, _Dtype):
        raise TypeError("a tensor without a storage or dtype")
    return _tensor(storage, dtype.name, storage_offset, size, stride)


def _tensor(storage: _Storage, dtype: str, offset: object, size: object, stride: object) -> _Tensor:
    if not _is_count(offset) or not _counts(size) or not _counts(stride):
        raise TypeError(f"tensor offset {offset!r}, size {size!r}, stride {stride!r}")
    if len(size) != len(stride):  # type: ignore[arg-type]
        raise TypeError(f"size {size!r} and stride {stride!r} differ in length")
    return _Tensor(storage, dtype, offset, tuple(size), tuple(stride))  # type: ignore[arg-type]


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> object:
    return data


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(value: object) -> bool:
    return isinstance(value, tuple) and all(_is_count(v) for v in value)


#: Everything a state-dict pickle may name: the rebuild functions, containers, storage classes
#: and dtypes. Anything else (``builtins.bytearray``, ``os.system``...) refuses the file.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.storage", "UntypedStorage"): _Dtype("U8"),
    **{("torch", name): _Dtype(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _Dtype(dtype) for name, dtype in _TORCH_DTYPES.items()},
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a state dict into stand-ins: names, dtypes, shapes and storage keys only."""

    def find_class(self, module: str, name: str) -> object:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found

    def persistent_load(self, pid: object) -> _Storage:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _Dtype)
            or not isinstance(pid[2], str)
            or not _is_count(pid[4])
        ):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return _Storage(pid[2], pid[1].name, pid[4])


def read_torch_file(
    path: Path, limit: int = MAX_PICKLE_BYTES, wanted: Callable[[str], bool] | None = None
) -> WeightFile:
    """The tensors of the ``torch.save`` file ``path``, located without reading their bytes.

    ``limit`` caps the pickle (a checkpoint passes what is left of its total header budget);
    every tensor is validated, but only those whose names ``wanted`` accepts (all by default)
    are kept.
    Raises :class:`CheckpointError` naming the file and what is wrong with it.
    """
    try:
        with (
            open_regular(path) as (descriptor, status),
            open(descriptor, "rb", closefd=False) as handle,
        ):
            _check_directory_size(path, descriptor, status.st_size)
            try:
                archive = zipfile.ZipFile(handle)
            except (zipfile.BadZipFile, ValueError, EOFError) as exc:
                raise CheckpointError(
                    f"{path}: not a torch.save zip archive ({exc}); legacy (pre-1.6) and "
                    "corrupt files cannot be read: convert the checkpoint to safetensors"
                ) from None
            records = _records(path, archive, status.st_size)
            pickle_info = records["data.pkl"]
            budget = min(limit, MAX_PICKLE_BYTES)
            if pickle_info.file_size > budget:
                raise CheckpointError(
                    f"{path}: its pickle (data.pkl) is {pickle_info.file_size} bytes, over the "
                    f"{budget / MiB:.3g} MiB a state dict of tensors needs; refused unread"
                )
            data = archive.read(pickle_info)
            _check_byte_order(path, archive, records)
            offsets = {
                name.removeprefix("data/"): (_data_offset(path, descriptor, info), info)
                for name, info in records.items()
                if name.startswith("data/")
            }
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    state = _unpickle(path, data)
    identity = FileIdentity.of(status)
    digest = hashlib.sha256(data).hexdigest()
    tensors = {
        name: _entry(path, name, tensor, offsets, digest, identity)
        for name, tensor in state.items()
        if isinstance(tensor, _Tensor)
    }
    entries = {name: e for name, e in tensors.items() if wanted is None or wanted(name)}
    return WeightFile(path, identity, len(data), entries)


def _check_directory_size(path: Path, descriptor: int, size: int) -> None:
    """Refuse a zip whose central directory is over :data:`MAX_DIRECTORY_BYTES`, from its end
    record (``torch.save`` writes no archive comment, so the record ends the file)."""
    end = read_at(descriptor, max(0, size - _END_RECORD.size), _END_RECORD.size)
    if len(end) < _END_RECORD.size or not end.startswith(zipfile.stringEndArchive):
        raise CheckpointError(
            f"{path}: not a torch.save zip archive (no zip end record at its end); legacy "
            "(pre-1.6) and corrupt files cannot be read: convert the checkpoint to safetensors"
        )
    directory_bytes = _END_RECORD.unpack(end)[5]
    if directory_bytes == 0xFFFFFFFF:  # zip64: the real size is in the zip64 end record
        locator = read_at(descriptor, size - _END_RECORD.size - _END_LOCATOR_64.size, 20)
        if len(locator) == _END_LOCATOR_64.size and locator.startswith(
            zipfile.stringEndArchive64Locator
        ):
            record = read_at(descriptor, _END_LOCATOR_64.unpack(locator)[2], _END_RECORD_64.size)
            if len(record) == _END_RECORD_64.size:
                directory_bytes = _END_RECORD_64.unpack(record)[8]
    if directory_bytes > MAX_DIRECTORY_BYTES:
        raise CheckpointError(
            f"{path}: its zip directory is {directory_bytes} bytes, over the "
            f"{MAX_DIRECTORY_BYTES // MiB} MiB a state dict of tensors needs; refused unread"
        )


def _records(path: Path, archive: zipfile.ZipFile, size: int) -> dict[str, zipfile.ZipInfo]:
    """The archive's records by name below its single top folder, checked for torch's layout."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: the zip archive names a record twice (hostile file)")
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{path}: expected one '<name>/data.pkl' record (a torch.save archive), "
            f"found {len(pickles)}"
        )
    top = pickles[0].removesuffix("data.pkl")
    records = {}
    for info in infos:
        if not info.filename.startswith(top):
            raise CheckpointError(f"{path}: record {info.filename!r} lies outside {top!r}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: record {info.filename!r} is compressed; torch.save stores records "
                "uncompressed (hostile or re-packed file)"
            )
        if info.header_offset + info.file_size > size:
            raise CheckpointError(f"{path}: record {info.filename!r} lies beyond the file's end")
        records[info.filename.removeprefix(top)] = info
    return records


def _check_byte_order(
    path: Path, archive: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo]
) -> None:
    info = records.get("byteorder")
    if info is None:
        return  # written before torch 2.1: little-endian
    order = archive.read(info) if info.file_size <= 16 else b"?"
    if order != b"little":
        raise CheckpointError(
            f"{path}: byte order {order.decode('ascii', 'replace')!r}; only little-endian "
            "checkpoints can be read"
        )


def _data_offset(path: Path, descriptor: int, info: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes start: after its local header, name and extra field."""
    header = read_at(descriptor, info.header_offset, _LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or not header.startswith(zipfile.stringFileHeader):
        raise CheckpointError(f"{path}: record {info.filename!r} has no local header")
    fields = _LOCAL_HEADER.unpack(header)
    return info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]


def _unpickle(path: Path, data: bytes) -> dict[object, object]:
    try:
        state = _MetadataUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as exc:
        raise CheckpointError(
            f"{path}: its pickle names {exc}, which a state dict of tensors never needs; "
            "refused before anything was built (convert trusted checkpoints to safetensors)"
        ) from None
    except Exception as exc:  # a corrupt pickle raises any of a dozen types
        raise CheckpointError(
            f"{path}: not a state dict of tensors ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _entry(
    path: Path,
    name: object,
    tensor: _Tensor,
    offsets: dict[str, tuple[int, zipfile.ZipInfo]],
    digest: str,
    identity: FileIdentity,
) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: tensor names must be strings")
    located = offsets.get(tensor.storage.key)
    if located is None:
        raise CheckpointError(f"{where}: its storage record data/{tensor.storage.key} is missing")
    start, record = located
    storage_bytes = tensor.storage.numel * ELEMENT_SIZES[tensor.storage.dtype]
    itemsize = ELEMENT_SIZES[tensor.dtype]
    begin = tensor.offset * itemsize
    nbytes = math.prod(tensor.shape) * itemsize
    if storage_bytes > record.file_size:
        raise CheckpointError(
            f"{where}: its storage claims {storage_bytes} bytes but its record "
            f"data/{tensor.storage.key} holds {record.file_size}"
        )
    if begin + nbytes > storage_bytes:
        raise CheckpointError(
            f"{where}: shape {list(tensor.shape)} at element {tensor.offset} needs "
            f"{begin + nbytes} bytes but its storage holds {storage_bytes}"
        )
    contiguous = all(
        stride == math.prod(tensor.shape[axis + 1 :])
        for axis, stride in enumerate(tensor.stride)
        if tensor.shape[axis] > 1
    )
    problem = (
        ""
        if contiguous
        else f"is stored non-contiguous (strides {list(tensor.stride)}); re-save it contiguous "
        "or convert the checkpoint to safetensors"
    )
    return TensorEntry(
        path,
        name,
        tensor.dtype,
        tensor.shape,
        start + int(begin),
        int(nbytes),
        digest,
        identity,
        problem,
    )
