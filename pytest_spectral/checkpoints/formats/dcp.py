"""``torch.distributed.checkpoint`` directories (torchtitan, FSDP2), read without a process group.

Such a directory holds ``.metadata``, a pickle describing every tensor (its dtype, size, and
the chunks each rank saved), and ``__<rank>_<n>.distcp`` files in which each chunk is the
output of ``torch.save(chunk)`` at a byte range. torch's own reader unpickles ``.metadata``
with the unrestricted ``pickle.load`` (``FileSystemReader.read_metadata`` in torch 2.13), so
a checkpoint from elsewhere could run code there; here it goes through a restricted unpickler
that knows only the metadata classes, torch's dtypes and ``torch.Size``, each replaced by an
inert record (:data:`_METADATA_CLASSES`), and refuses any other global before anything is
called. Each chunk is then located with the ``torch.save`` reader of :mod:`.torch_file` (its
own restricted unpickler) inside its byte range, and read like any other weight; a tensor saved
in several chunks is put back together when a run reads it (:class:`~.sources.Assembled`).

The directory carries no model config: ``--spectral-config``, or a ``config.json`` (or
Mistral-style ``params.json``) in it, gives one. Names are the state dict's flattened keys
(``model.layers.0...``); torchtitan's native names get their transformers names
(:mod:`.meta_names`).
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path

from pytest_spectral.checkpoints.formats.base import Format, TensorMap, read_config
from pytest_spectral.checkpoints.formats.meta_names import native_or, with_transformers_names
from pytest_spectral.checkpoints.formats.mistral import PARAMS_FILE, params_config
from pytest_spectral.checkpoints.formats.shards import MAX_TOTAL_HEADER_BYTES, named_file
from pytest_spectral.checkpoints.formats.sources import (
    Assembled,
    Chunk,
    StoredTensor,
    TensorSource,
)
from pytest_spectral.checkpoints.formats.torch_file import (
    ALLOWED_GLOBALS,
    RefusedGlobal,
    read_torch_record,
)
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import (
    MAX_INDEX_BYTES,
    FileIdentity,
    UntrustedFileError,
    open_regular,
    read_capped,
)

METADATA_FILE = ".metadata"
Counts = tuple[int, ...]
#: tensor name -> (dtype, size, [(chunk offsets, chunk sizes)])
Described = dict[str, tuple[str, Counts, list[tuple[Counts, Counts]]]]
#: (tensor name, chunk offsets) -> (relative path, byte offset, byte length, transforms)
Located = dict[tuple[str, Counts], tuple[object, int, int, object]]


class _Record:
    """An inert stand-in for one of the metadata classes: it keeps the state it is given."""

    def __new__(cls, *args: object) -> _Record:
        record = super().__new__(cls)
        record.state = args
        return record

    state: object

    def __setstate__(self, state: object) -> None:
        self.state = state


#: ``torch.distributed.checkpoint`` classes a ``.metadata`` pickle names, as inert records
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): type(name, (_Record,), {})
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): type(
        "_StorageInfo", (_Record,), {}
    )
}


def _text(*parts: object) -> str:
    """``torch.serialization._get_layout('torch.strided')``, ``PosixPath(...)``: kept as text."""
    if not all(isinstance(p, str) for p in parts):
        raise TypeError("expected strings")
    return "/".join(parts)  # type: ignore[arg-type]


def _memory_format(code: object) -> object:
    if not isinstance(code, int):
        raise TypeError("a memory format is an integer code")
    return code


_METADATA_GLOBALS: dict[tuple[str, str], object] = {
    **{key: value for key, value in ALLOWED_GLOBALS.items() if key[0] == "torch"},
    **_METADATA_CLASSES,
    ("torch.serialization", "_get_layout"): _text,
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): _memory_format,
    ("pathlib", "PosixPath"): _text,
    ("pathlib", "WindowsPath"): _text,
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        found = _METADATA_GLOBALS.get((module, name))
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids have no place in checkpoint metadata")


def is_distributed(directory: Path) -> bool:
    return os.path.lexists(directory / METADATA_FILE)


def _kind(record: object) -> str:
    return type(record).__name__ if isinstance(record, _Record) else "?"


def _fields(record: object, kind: str, where: str) -> dict[str, object]:
    if _kind(record) != kind or not isinstance(record.state, dict):  # type: ignore[attr-defined]
        raise ValueError(f"{where} is not a {kind}")
    return record.state  # type: ignore[attr-defined]


def _counts(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"{where} is not a tuple of counts")
    return value


class DistributedCheckpoint(Format):
    """A ``torch.distributed.checkpoint`` directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.metadata_path = root / METADATA_FILE

    def config(self) -> tuple[dict[str, object], Path]:
        if os.path.lexists(self.root / "config.json"):
            return read_config(self.root / "config.json"), self.root / "config.json"
        if os.path.lexists(self.root / PARAMS_FILE):
            return params_config(self.root / PARAMS_FILE, "llama"), self.root / PARAMS_FILE
        raise CheckpointError(
            f"{self.root}: a torch.distributed.checkpoint directory carries no model config; "
            "give the model's config.json with --spectral-config"
        )

    def tensors(self, wanted: Callable[[str], bool], head_dim: int) -> TensorMap:
        accepts = native_or(wanted)
        described, storage = self._metadata()
        found: dict[str, TensorSource] = {}
        budget = MAX_TOTAL_HEADER_BYTES
        chunks_by_file: dict[Path, list[tuple[str, tuple[int, ...], int, int]]] = {}
        for fqn, (_, _, chunks) in described.items():
            if not accepts(fqn):
                continue
            for offsets, _ in chunks:
                info = storage.get((fqn, offsets))
                if info is None:
                    raise CheckpointError(
                        f"{self.metadata_path}: chunk {list(offsets)} of {fqn!r} has no storage"
                    )
                relative, start, length, transforms = info
                if transforms:
                    raise CheckpointError(
                        f"{self.metadata_path}: {fqn!r} is stored with transforms "
                        f"{transforms!r:.80} (compression or another extension); only plain "
                        "items can be read"
                    )
                path = named_file(self.metadata_path, relative, f"for {fqn!r}")
                chunks_by_file.setdefault(path, []).append((fqn, offsets, start, length))
        located: dict[tuple[str, tuple[int, ...]], StoredTensor] = {}
        for path, items in chunks_by_file.items():
            try:
                with open_regular(path) as (descriptor, status):
                    identity = FileIdentity.of(status)
                    for fqn, offsets, start, length in items:
                        if start + length > status.st_size:
                            raise CheckpointError(
                                f"{path}: item {fqn!r} at bytes {start}-{start + length} lies "
                                f"beyond the {status.st_size}-byte file (truncated)"
                            )
                        entry, pickle_bytes = read_torch_record(
                            path, descriptor, identity, start, length, fqn
                        )
                        budget -= pickle_bytes
                        if budget < 0:
                            raise CheckpointError(
                                f"{path}: the items' pickles exceed the "
                                f"{MAX_TOTAL_HEADER_BYTES >> 20} MiB budget for all of the "
                                "checkpoint's headers together; refused"
                            )
                        located[(fqn, offsets)] = entry
            except UntrustedFileError as exc:
                raise CheckpointError(str(exc)) from None
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
        for fqn, (dtype, size, chunks) in described.items():
            if accepts(fqn):
                found[fqn] = _tensor(fqn, dtype, size, chunks, located)
        return with_transformers_names(found, head_dim)

    def _metadata(self) -> tuple[Described, Located]:
        """Each tensor's (dtype, size, chunks), and where each chunk is stored."""
        path = self.metadata_path
        try:
            data = read_capped(path, MAX_INDEX_BYTES, "checkpoint metadata")
        except UntrustedFileError as exc:
            raise CheckpointError(str(exc)) from None
        try:
            root = _MetadataUnpickler(io.BytesIO(data)).load()
        except RefusedGlobal as exc:
            raise CheckpointError(
                f"{path}: its pickle names {exc}, which checkpoint metadata never needs; "
                "refused before anything was built"
            ) from None
        except Exception as exc:  # a corrupt pickle raises any of a dozen types
            raise CheckpointError(
                f"{path}: not torch.distributed.checkpoint metadata "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        try:
            return _described(root)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None


def _described(root: object) -> tuple[Described, Located]:
    """What the metadata records say, every field checked (``ValueError`` names the tensor)."""
    metadata = _fields(root, "Metadata", "the pickle")
    tensors = metadata.get("state_dict_metadata")
    storage = metadata.get("storage_data")
    if not isinstance(tensors, dict) or not isinstance(storage, dict):
        raise ValueError("state_dict_metadata and storage_data must be dicts")
    described: Described = {}
    for fqn, record in tensors.items():
        if not isinstance(fqn, str):
            raise ValueError(f"tensor name {fqn!r:.80} is not a string")
        if _kind(record) == "BytesStorageMetadata":
            continue
        fields = _fields(record, "TensorStorageMetadata", repr(fqn))
        properties = fields.get("properties")
        state = properties.state if _kind(properties) == "TensorProperties" else None  # type: ignore[union-attr]
        dtype = state[0] if isinstance(state, tuple) and state else None
        dtype_name = getattr(dtype, "name", None)
        if not isinstance(dtype_name, str):
            raise ValueError(f"{fqn!r} has no dtype")
        size = _counts(fields.get("size"), f"the size of {fqn!r}")
        chunks = []
        raw_chunks = fields.get("chunks")
        if not isinstance(raw_chunks, list):
            raise ValueError(f"the chunks of {fqn!r} are not a list")
        for chunk in raw_chunks:
            chunk_fields = _fields(chunk, "ChunkStorageMetadata", f"a chunk of {fqn!r}")
            offsets = _counts(chunk_fields.get("offsets"), f"a chunk offset of {fqn!r}")
            sizes = _counts(chunk_fields.get("sizes"), f"a chunk size of {fqn!r}")
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise ValueError(f"a chunk of {fqn!r} has the wrong number of dimensions")
            if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
                raise ValueError(f"a chunk of {fqn!r} lies outside its size {list(size)}")
            chunks.append((offsets, sizes))
        if sum(math.prod(s) for _, s in chunks) != math.prod(size):
            raise ValueError(f"the chunks of {fqn!r} do not add up to its size {list(size)}")
        described[fqn] = (dtype_name, size, chunks)
    located: Located = {}
    for index, info in storage.items():
        index_fields = _fields(index, "MetadataIndex", "a storage index")
        fqn, offset = index_fields.get("fqn"), index_fields.get("offset")
        if fqn not in described:
            continue
        info_fields = _fields(info, "_StorageInfo", f"the storage of {fqn!r}")
        start, length = info_fields.get("offset"), info_fields.get("length")
        if not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (start, length)
        ):
            raise ValueError(f"the storage of {fqn!r} has no byte range")
        key = (fqn, _counts(offset, f"a storage offset of {fqn!r}"))
        located[key] = (
            info_fields.get("relative_path"),
            start,
            length,
            info_fields.get("transform_descriptors"),
        )
    return described, located


def _tensor(
    fqn: str,
    dtype: str,
    size: tuple[int, ...],
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]],
    located: dict[tuple[str, tuple[int, ...]], StoredTensor],
) -> TensorSource:
    parts = []
    for offsets, sizes in chunks:
        entry = located[(fqn, offsets)]
        if entry.shape != sizes or entry.dtype != dtype:
            return Assembled(
                fqn, dtype, size, [Chunk(offsets, entry)],
                f"chunk at {list(offsets)} holds {entry.dtype} {list(entry.shape)}, not the "
                f"{dtype} {list(sizes)} the metadata describes",
            )  # fmt: skip
        parts.append(Chunk(offsets, entry))
    if len(parts) == 1 and parts[0].source.shape == size:
        return parts[0].source
    return Assembled(fqn, dtype, size, parts)
