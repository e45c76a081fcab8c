"""Reading ``torch.save`` files without letting their pickle act.

Two layouts exist. The zip archive (torch >= 1.6): ``<name>/data.pkl``, a pickle describing
the objects, and one uncompressed record per storage, ``<name>/data/<key>``. The legacy layout
(before 1.6): four pickles one after another (magic number, protocol version, system info,
the object), a fifth listing the storage keys, then each storage's bytes in that order, each
preceded by its element count.

``torch.load`` is not used on either: it cannot say where a tensor's bytes lie without
memory-mapping the file (a file truncated under a map is a ``SIGBUS`` that kills the
interpreter), and its ``weights_only`` unpickler still lets a pickle build ``bytearray``, ``set``
or ``Counter`` objects of any size (a 1.4 KB file can ask for gigabytes). Instead, every step
is bounded:

1. zip: the end record, read directly (a central directory over :data:`MAX_DIRECTORY_BYTES` is
   refused before ``zipfile`` parses it), then the directory with ``zipfile``: names unique,
   one ``data.pkl`` of at most :data:`MAX_PICKLE_BYTES`, every record stored uncompressed
   inside the file, little-endian; legacy: the pickles are read from a stream that ends after
   :data:`MAX_PICKLE_BYTES` and the storages are located by their 8-byte counts, one read
   each, every one checked against the file's size;
2. the pickle, with a ``pickle.Unpickler`` whose ``find_class`` knows only the globals
   ``torch.save`` writes for tensors, storages, dtypes and the plain containers of training
   checkpoints (:data:`ALLOWED_GLOBALS`), and returns inert stand-ins for them: any other
   global refuses the file where the unpickler meets it, before anything is called. The
   containers it may build (``set``, ``torch.Size``, ``bytes``) take only what the pickle
   itself holds, so their size is bounded by the pickle's. Storages are never loaded, only
   their keys noted.

The result is one :class:`StoredTensor` per tensor, at its bytes' offset in the file, read
like a safetensors tensor (plain reads, file identity verified), and the pickle's other plain
values (a training framework's hyper-parameters, say). torch is not imported.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pytest_spectral.checkpoints.formats.safetensors import WeightFile
from pytest_spectral.checkpoints.formats.sources import ELEMENT_SIZES, StoredTensor
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import (
    FileIdentity,
    MiB,
    UntrustedFileError,
    open_regular,
    pread_into,
    read_at,
)

#: The pickle of a state dict takes about 100 bytes per tensor: room for some 20,000 (a
#: training checkpoint's optimizer state takes two or three entries per weight).
MAX_PICKLE_BYTES = 2 * MiB
#: The zip directory takes about 100 bytes per record (one per storage).
MAX_DIRECTORY_BYTES = 4 * MiB
#: ``torch.serialization.MAGIC_NUMBER``, the first pickle of a legacy file.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

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
    "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",
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
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
    "int8": "I8",
    "uint8": "U8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "bool": "BOOL",
    "complex64": "C64",
    "complex128": "C128",
}
#: Other ``torch.<name>`` globals that can only be dtypes or storage classes: accepted as a
#: dtype of unknown size, so that such a tensor refuses only a run that reads it.
_OTHER_DTYPE = re.compile(r"^(?:[A-Z]\w*Storage|(?:b?float|u?int|complex|bits|q\w*int)\w*)$")
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
        raise TypeError(f"tensor offset {offset!r:.80}, size {size!r:.80}, stride {stride!r:.80}")
    if len(size) != len(stride):  # type: ignore[arg-type]
        raise TypeError(f"size {size!r:.80} and stride {stride!r:.80} differ in length")
    return _Tensor(storage, dtype, offset, tuple(size), tuple(stride))  # type: ignore[arg-type]


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> object:
    return data


def _rebuild_parameter_with_state(
    data: object, requires_grad: object, backward_hooks: object, state: object
) -> object:
    return data


def _set(items: object = ()) -> frozenset[object]:
    """``set(list)`` as protocol 2 writes it; only a list the pickle holds (hashable items)."""
    if not isinstance(items, list | tuple):
        raise TypeError(f"set of {type(items).__name__}")
    return frozenset(items)


def _size(dimensions: object = ()) -> tuple[int, ...]:
    """``torch.Size`` (DeepSpeed's ``param_shapes``): a tuple of counts the pickle holds."""
    if not _counts(dimensions):
        raise TypeError(f"torch.Size of {dimensions!r:.80}")
    return tuple(dimensions)  # type: ignore[arg-type]


def _encode(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode``, which protocol 2 writes for ``bytes``: a string the pickle holds."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TypeError("bytes from anything but a latin1 string")
    return text.encode("latin1")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(value: object) -> bool:
    return isinstance(value, tuple) and all(_is_count(v) for v in value)


#: Everything a checkpoint pickle may name: the rebuild functions, plain containers, storage
#: classes and dtypes. Anything else (``builtins.bytearray``, ``os.system``...) refuses the file.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): _set,
    ("__builtin__", "set"): _set,
    ("builtins", "frozenset"): _set,
    ("__builtin__", "frozenset"): _set,
    ("torch", "Size"): _size,
    ("_codecs", "encode"): _encode,
    ("torch.storage", "UntypedStorage"): _Dtype("U8"),
    **{("torch", name): _Dtype(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _Dtype(dtype) for name, dtype in _TORCH_DTYPES.items()},
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint into stand-ins: names, dtypes, shapes, storage keys and plain
    values only. ``storage_dtypes`` notes every storage the pickle refers to."""

    def __init__(self, stream: io.IOBase) -> None:
        super().__init__(stream)
        self.storage_dtypes: dict[str, str] = {}

    def find_class(self, module: str, name: str) -> object:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None and module == "torch" and _OTHER_DTYPE.match(name):
            found = _Dtype(f"torch.{name}")
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found

    def persistent_load(self, pid: object) -> _Storage:
        # zip: ("storage", type, key, location, numel); legacy adds a view's metadata (None)
        if (
            not isinstance(pid, tuple)
            or len(pid) not in (5, 6)
            or pid[0] != "storage"
            or not isinstance(pid[1], _Dtype)
            or not isinstance(pid[2], str)
            or not _is_count(pid[4])
            or (len(pid) == 6 and pid[5] is not None)
        ):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        self.storage_dtypes[pid[2]] = pid[1].name
        return _Storage(pid[2], pid[1].name, pid[4])


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy layout's framing pickles: plain values, no global at all."""

    def find_class(self, module: str, name: str) -> object:
        raise RefusedGlobal(f"{module}.{name}")


@dataclass(frozen=True)
class TorchFile(WeightFile):
    """A ``torch.save`` file: its tensors (``entries``, by their name in the pickle's top-level
    dict, or in ``container``), and the pickle's root object with tensors as stand-ins."""

    root: object = None
    #: the top-level key holding the state dict (``state_dict``, ``module``...), if any
    container: str | None = None
    #: every tensor the pickle describes, under its name in the chosen dict
    all_entries: Mapping[str, StoredTensor] = field(default_factory=dict)


#: Top-level keys under which training frameworks keep the model's state dict: PyTorch
#: Lightning ``state_dict``, DeepSpeed ``module``, nanoGPT ``model``, and a common hand-made one.
STATE_DICT_KEYS = ("state_dict", "module", "model", "model_state_dict")


def read_torch_file(
    path: Path, limit: int = MAX_PICKLE_BYTES, wanted: Callable[[str], bool] | None = None
) -> TorchFile:
    """The tensors of the ``torch.save`` file ``path`` (zip or legacy layout), located
    without reading their bytes.

    ``limit`` caps the pickle (a checkpoint passes what is left of its total header budget);
    every tensor is validated, but only those whose names ``wanted`` accepts (all by default)
    are kept in ``entries``. Tensors are taken from the top-level dict, or from the first of
    :data:`STATE_DICT_KEYS` that holds a dict of tensors.
    Raises :class:`CheckpointError` naming the file and what is wrong with it.
    """
    budget = min(limit, MAX_PICKLE_BYTES)
    try:
        with open_regular(path) as (descriptor, status):
            identity = FileIdentity.of(status)
            prefix = read_at(descriptor, 0, 4)
            if prefix.startswith(b"PK"):
                data, storages = _zip_layout(path, descriptor, 0, status.st_size, budget)
                root, _ = _unpickle(path, data)
            else:
                data, root, storages = _legacy_layout(path, descriptor, status.st_size, budget)
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    state, container = _state_dict(path, root)
    digest = hashlib.sha256(data).hexdigest()
    tensors = {
        _name(path, name): _entry(path, name, tensor, storages, digest, identity)
        for name, tensor in state.items()
        if isinstance(tensor, _Tensor)
    }
    entries = {name: e for name, e in tensors.items() if wanted is None or wanted(name)}
    return TorchFile(path, identity, len(data), entries, root, container, tensors)


def read_torch_record(
    path: Path, descriptor: int, identity: FileIdentity, start: int, length: int, name: str
) -> tuple[StoredTensor, int]:
    """The single tensor ``torch.save(tensor)`` wrote into bytes ``[start, start + length)`` of
    ``path`` (open as ``descriptor``), as a distributed checkpoint stores each item; and the
    size of its pickle. ``name`` is used for the entry and in messages."""
    data, storages = _zip_layout(path, descriptor, start, length, MAX_PICKLE_BYTES)
    tensor, _ = _unpickle(path, data)
    if not isinstance(tensor, _Tensor):
        raise CheckpointError(
            f"{path}: item {name!r} at byte {start} is not a tensor ({type(tensor).__name__})"
        )
    digest = hashlib.sha256(data).hexdigest()
    return _entry(path, name, tensor, storages, digest, identity), len(data)


#: where each storage's bytes lie: key -> (absolute offset, bytes available there)
Storages = dict[str, tuple[int, int]]


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of a descriptor as a read-only file, read with
    ``pread``: ``zipfile`` and the unpickler see only that window."""

    def __init__(self, descriptor: int, start: int, length: int) -> None:
        super().__init__()
        self._descriptor, self._start, self._length, self._position = (
            descriptor,
            start,
            length,
            0,
        )

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._length - self._position)
        if count <= 0:
            return 0
        view = memoryview(buffer).cast("B")[:count]
        got = pread_into(self._descriptor, view, self._start + self._position)
        self._position += got
        return got


def _zip_layout(
    path: Path, descriptor: int, start: int, size: int, budget: int
) -> tuple[bytes, Storages]:
    """The pickle and the storages of a zip archive at bytes ``[start, start + size)``."""
    _check_directory_size(path, descriptor, start, size)
    window = io.BufferedReader(_Window(descriptor, start, size))
    try:
        archive = zipfile.ZipFile(window)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: not a torch.save zip archive ({exc}); corrupt or not a torch file"
        ) from None
    records = _records(path, archive, size)
    pickle_info = records["data.pkl"]
    if pickle_info.file_size > budget:
        raise CheckpointError(
            f"{path}: its pickle (data.pkl) is {pickle_info.file_size} bytes, over the "
            f"{budget / MiB:.3g} MiB a state dict of tensors needs; refused unread"
        )
    data = archive.read(pickle_info)
    _check_byte_order(path, archive, records)
    storages = {
        name.removeprefix("data/"): (
            start + _data_offset(path, descriptor, start, info),
            info.file_size,
        )
        for name, info in records.items()
        if name.startswith("data/")
    }
    return data, storages


def _check_directory_size(path: Path, descriptor: int, start: int, size: int) -> None:
    """Refuse a zip whose central directory is over :data:`MAX_DIRECTORY_BYTES`, from its end
    record (``torch.save`` writes no archive comment, so the record ends the archive)."""
    end = read_at(descriptor, start + max(0, size - _END_RECORD.size), _END_RECORD.size)
    if len(end) < _END_RECORD.size or not end.startswith(zipfile.stringEndArchive):
        raise CheckpointError(
            f"{path}: not a torch.save zip archive (no zip end record at its end); "
            "corrupt or truncated"
        )
    directory_bytes = _END_RECORD.unpack(end)[5]
    if directory_bytes == 0xFFFFFFFF:  # zip64: the real size is in the zip64 end record
        locator = read_at(descriptor, start + size - _END_RECORD.size - _END_LOCATOR_64.size, 20)
        if len(locator) == _END_LOCATOR_64.size and locator.startswith(
            zipfile.stringEndArchive64Locator
        ):
            offset = _END_LOCATOR_64.unpack(locator)[2]
            record = read_at(descriptor, start + offset, _END_RECORD_64.size)
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


def _data_offset(path: Path, descriptor: int, start: int, info: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes start in the archive: after its local header, name and
    extra field."""
    header = read_at(descriptor, start + info.header_offset, _LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or not header.startswith(zipfile.stringFileHeader):
        raise CheckpointError(f"{path}: record {info.filename!r} has no local header")
    fields = _LOCAL_HEADER.unpack(header)
    return info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]


def _legacy_layout(
    path: Path, descriptor: int, size: int, budget: int
) -> tuple[bytes, object, Storages]:
    """The object pickle, the root object and the storages of a legacy (pre-1.6) file."""
    stream = io.BufferedReader(_Window(descriptor, 0, min(size, budget)))

    def framing(what: str) -> object:
        try:
            return _PlainUnpickler(stream).load()
        except RefusedGlobal as exc:
            raise CheckpointError(
                f"{path}: its {what} names {exc}; not a torch.save file"
            ) from None
        except Exception as exc:
            raise CheckpointError(_not_torch(path, exc, size, budget, stream.tell())) from None

    magic = framing("first pickle")
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointError(
            f"{path}: neither a torch.save zip archive nor a legacy torch.save file "
            "(no magic number); not a PyTorch checkpoint"
        )
    if framing("protocol pickle") != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"{path}: legacy torch.save protocol version is not 1001")
    system = framing("system information")
    if not isinstance(system, dict) or system.get("little_endian") is not True:
        raise CheckpointError(f"{path}: only little-endian legacy torch.save files can be read")
    begin = stream.tell()
    root, dtypes = _unpickle(path, stream, size=size, budget=budget)
    data = read_at(descriptor, begin, stream.tell() - begin)
    keys = framing("storage list")
    if not isinstance(keys, list) or set(keys) != set(dtypes):
        raise CheckpointError(
            f"{path}: its storage list does not name the storages its tensors use (corrupt file)"
        )
    return data, root, _legacy_storages(path, descriptor, size, stream.tell(), keys, dtypes)


def _legacy_storages(
    path: Path, descriptor: int, size: int, offset: int, keys: list[str], dtypes: dict[str, str]
) -> Storages:
    """Walk the storages after the pickles: each is an 8-byte little-endian element count,
    then its bytes, in the order of ``keys``; ``dtypes`` holds each storage's dtype."""
    storages: Storages = {}
    for key in keys:
        header = read_at(descriptor, offset, 8)
        if len(header) < 8:
            raise CheckpointError(
                f"{path}: storage {key!r} starts beyond the file's end (truncated file)"
            )
        (count,) = struct.unpack("<q", header)
        element_size = ELEMENT_SIZES.get(dtypes[key])
        if element_size is None:
            raise CheckpointError(
                f"{path}: storage {key!r} has dtype {dtypes[key]}, unknown to this plugin; the "
                "storages after it cannot be located (convert the checkpoint to safetensors)"
            )
        nbytes = count * element_size
        if count < 0 or offset + 8 + nbytes > size:
            raise CheckpointError(
                f"{path}: storage {key!r} claims {count} elements, beyond the file's end "
                "(truncated or corrupt file)"
            )
        storages[key] = (offset + 8, int(nbytes))
        offset += 8 + int(nbytes)
    return storages


def _not_torch(path: Path, exc: Exception, size: int, budget: int, position: int) -> str:
    if size > budget and position >= budget - 1:
        return (
            f"{path}: its pickles run past {budget / MiB:.3g} MiB, more than a state dict of "
            "tensors needs; refused"
        )
    return (
        f"{path}: not a torch.save file ({type(exc).__name__}: {str(exc)[:200]}); corrupt, "
        "truncated or another format"
    )


def _unpickle(
    path: Path, source: bytes | io.BufferedReader, *, size: int = 0, budget: int = 0
) -> tuple[object, dict[str, str]]:
    """The root object with stand-ins, and the dtype of every storage it refers to."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    unpickler = _MetadataUnpickler(stream)
    try:
        return unpickler.load(), unpickler.storage_dtypes
    except RefusedGlobal as exc:
        raise CheckpointError(
            f"{path}: its pickle names {exc}, which a state dict of tensors never needs; "
            "refused before anything was built (convert trusted checkpoints to safetensors)"
        ) from None
    except Exception as exc:  # a corrupt pickle raises any of a dozen types
        if isinstance(source, bytes):
            raise CheckpointError(
                f"{path}: not a state dict of tensors ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        raise CheckpointError(_not_torch(path, exc, size, budget, stream.tell())) from None


def _state_dict(path: Path, root: object) -> tuple[dict[object, object], str | None]:
    """The dict holding the tensors: the one of :data:`STATE_DICT_KEYS` whose value is a dict
    of tensors (a training framework's checkpoint), else the top-level dict itself.

    Two of those keys holding tensors are refused: each framework loads its own (nanoGPT
    ``model``, Lightning ``state_dict``), so a second state dict could stand in for the
    weights the model really uses. (Tensors at the top level beside one, as nanoGPT's
    ``best_val_loss``, are no state dict.)"""
    if not isinstance(root, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(root).__name__}")
    found = [
        key
        for key in STATE_DICT_KEYS
        if isinstance(value := root.get(key), dict)
        and any(isinstance(v, _Tensor) for v in value.values())
    ]
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: holds a state dict under each of {', '.join(map(repr, found))}; which one "
            "the model loads is ambiguous, so none is analysed: save the one to check on its own"
        )
    if found:
        return root[found[0]], found[0]
    if not any(isinstance(v, _Tensor) for v in root.values()):
        keys = ", ".join(repr(k) for k in list(root)[:12])
        raise CheckpointError(
            f"{path}: holds no tensors at its top level, nor a dict of tensors under "
            f"{', '.join(STATE_DICT_KEYS)} (its keys: {keys or 'none'})"
        )
    return root, None


def _name(path: Path, name: object) -> str:
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: tensor name {name!r:.80} is not a string")
    return name


def _entry(
    path: Path,
    name: object,
    tensor: _Tensor,
    storages: Storages,
    digest: str,
    identity: FileIdentity,
) -> StoredTensor:
    where = f"{path}: tensor {name!r}"
    name = _name(path, name)
    located = storages.get(tensor.storage.key)
    if located is None:
        raise CheckpointError(f"{where}: its storage record data/{tensor.storage.key} is missing")
    start, available = located
    storage_size = ELEMENT_SIZES.get(tensor.storage.dtype)
    itemsize = ELEMENT_SIZES.get(tensor.dtype)
    if storage_size is None or itemsize is None:
        unknown = tensor.dtype if itemsize is None else tensor.storage.dtype
        return StoredTensor(
            path, name, tensor.dtype, tensor.shape, start, 0, digest, identity,
            f"has dtype {unknown}, unknown to this plugin",
        )  # fmt: skip
    storage_bytes = tensor.storage.numel * storage_size
    begin = tensor.offset * itemsize
    nbytes = math.prod(tensor.shape) * itemsize
    if storage_bytes > available:
        raise CheckpointError(
            f"{where}: its storage claims {storage_bytes} bytes but its record "
            f"data/{tensor.storage.key} holds {available}"
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
    return StoredTensor(
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
