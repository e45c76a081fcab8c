"""Hugging Face layouts: ``config.json`` with safetensors or ``pytorch_model.bin`` weights.

A directory as ``save_pretrained`` writes it (``model.safetensors``, shards listed in
``model.safetensors.index.json``, or the ``pytorch_model.bin`` equivalents), or a single weight
file with ``config.json`` beside it. Only the index and the shards holding wanted tensors are
read; files the index does not list (a Mistral repository's ``consolidated.safetensors``, Meta's
``original/``) are never opened.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pytest_spectral.checkpoints.formats.base import Format, TensorMap, read_config
from pytest_spectral.checkpoints.formats.meta_names import native_or, with_transformers_names
from pytest_spectral.checkpoints.formats.safetensors import (
    MAX_HEADER_BYTES,
    WeightFile,
    read_header,
)
from pytest_spectral.checkpoints.formats.shards import (
    MAX_TOTAL_HEADER_BYTES,
    HeaderBudget,
    check_inside,
    named_file,
)
from pytest_spectral.checkpoints.formats.sources import TensorSource, UnreadableTensor
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import MAX_INDEX_BYTES, UntrustedFileError, load_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"
#: What makes a directory a Hugging Face checkpoint, in the order transformers prefers them.
WEIGHT_FILES = (INDEX_FILE, SINGLE_FILE, BIN_INDEX_FILE, BIN_FILE)

Reader = Callable[[Path, int, Callable[[str], bool]], WeightFile]


def has_weights(directory: Path) -> bool:
    return any(os.path.lexists(directory / name) for name in WEIGHT_FILES)


class HuggingFaceDirectory(Format):
    """``config.json`` and the weights ``save_pretrained`` writes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def config(self) -> tuple[dict[str, object], Path]:
        return read_config(self.root / "config.json"), self.root / "config.json"

    def tensors(self, wanted: Callable[[str], bool], head_dim: int) -> TensorMap:
        for name, reader in ((INDEX_FILE, read_header), (BIN_INDEX_FILE, _read_torch_file)):
            if os.path.lexists(self.root / name):
                return sharded_tensors(self.root / name, reader, wanted, HeaderBudget())
        for name in (SINGLE_FILE, BIN_FILE):
            if os.path.lexists(self.root / name):
                check_inside(self.root, self.root / name, str(self.root / name))
                return dict(read_weight_file(self.root / name, wanted).entries)
        found = sorted(
            p.name for p in self.root.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"}
        )
        raise CheckpointError(
            f"{self.root}: no {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or {BIN_INDEX_FILE}"
            + (f" (found: {', '.join(found)})" if found else " and no weight files at all")
            + "; see the README for the layouts pytest-spectral reads"
        )


def read_weight_file(
    path: Path, wanted: Callable[[str], bool], limit: int = MAX_TOTAL_HEADER_BYTES
) -> WeightFile:
    """One safetensors or ``torch.save`` file, by its name."""
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _read_torch_file(path, limit, wanted)
    return read_header(path, min(limit, MAX_HEADER_BYTES), wanted)


def _read_torch_file(path: Path, limit: int, wanted: Callable[[str], bool]) -> WeightFile:
    """:func:`.torch_file.read_torch_file`, imported only for ``torch.save`` files: a
    safetensors checkpoint never loads the pickle reader."""
    from pytest_spectral.checkpoints.formats.torch_file import read_torch_file

    return read_torch_file(path, limit, wanted)


def sharded_tensors(
    index: Path, reader: Reader, wanted: Callable[[str], bool], budget: HeaderBudget
) -> dict[str, TensorSource]:
    """The tensors listed in ``index``, each physical shard read once.

    Every shard name is checked; only shards holding ``wanted`` tensors are read. A tensor the
    index promises but its shard lacks is kept as unreadable: it refuses only a run that
    reads it (transformers too loads a model whose index lists a tensor it never uses).
    """
    try:
        document = load_json(index, MAX_INDEX_BYTES, "weight index")
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
    entries: dict[str, TensorSource] = {}
    paths: dict[str, Path] = {}
    for name, shard in weight_map.items():
        shard_path = paths.get(shard) if isinstance(shard, str) else None
        if shard_path is None:
            shard_path = paths[shard] = named_file(index, shard, f"for {name!r}")
        if not wanted(name):
            continue  # never read: only its shard's name is checked
        entry = budget.read(shard_path, reader, wanted).entries.get(name)
        entries[name] = entry or UnreadableTensor(
            shard_path, name, f"promised by {index.name} is missing from the shard"
        )
    return entries


class WeightFileWithConfig(Format):
    """A single safetensors file with ``config.json`` beside it (its tensors may have Hugging
    Face names or Meta's and Mistral's native ones)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path.parent

    def config(self) -> tuple[dict[str, object], Path]:
        return read_config(self.root / "config.json"), self.root / "config.json"

    def tensors(self, wanted: Callable[[str], bool], head_dim: int) -> TensorMap:
        entries = read_header(self.path, MAX_HEADER_BYTES, native_or(wanted)).entries
        return with_transformers_names(entries, head_dim)
