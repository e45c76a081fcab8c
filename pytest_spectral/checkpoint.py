"""Locating a checkpoint's attention weights from ``config.json`` and safetensors headers.

Nothing here reads a weight: opening a checkpoint costs a few small reads, so every pytest
worker can do it at collection time. Shapes are checked against the config up front, so a
mismatch is a usage error before the first item runs rather than a crash in the middle.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.errors import CheckpointError
from pytest_spectral.safetensors_header import DTYPE_SIZES, TensorEntry, read_header

MATRICES: tuple[str, ...] = ("q", "k", "v", "o")
#: model_type values whose attention uses the Llama tensor names and head layout.
LLAMA_FAMILY: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
_LLAMA_NAMES = {m: f"layers.{{layer}}.self_attn.{m}_proj.weight" for m in MATRICES}
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class Geometry:
    """Head layout of the attention blocks, as ``config.json`` describes it."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int

    @property
    def group_size(self) -> int:
        """Query heads sharing one K/V head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    def kv_head_of(self, head: int) -> int:
        return head // self.group_size

    def distinct_heads(self, matrix: str) -> int:
        """How many different slices ``matrix`` has: one per K/V head for k and v."""
        return self.kv_heads if matrix in ("k", "v") else self.heads

    def expected_shape(self, matrix: str) -> tuple[int, int]:
        width = self.distinct_heads(matrix) * self.head_dim
        return (self.hidden, width) if matrix == "o" else (width, self.hidden)

    def slice_shape(self, matrix: str) -> tuple[int, int]:
        """Shape ``[m, n]`` of one head's block as it sits in the weight matrix."""
        return (self.hidden, self.head_dim) if matrix == "o" else (self.head_dim, self.hidden)


@dataclass(frozen=True)
class Checkpoint:
    """A readable checkpoint: its config, geometry and where each attention weight lives."""

    root: Path
    config: dict[str, object]
    model_type: str
    geometry: Geometry
    tensors: dict[tuple[int, str], TensorEntry]

    @property
    def dtype(self) -> str:
        """The storage dtype of the attention weights (the most common one if mixed)."""
        return Counter(t.dtype for t in self.tensors.values()).most_common(1)[0][0]

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})


def open_checkpoint(path: Path) -> Checkpoint:
    """Read ``config.json`` and the safetensors headers of the checkpoint at ``path``.

    ``path`` is a directory, or a single ``.safetensors`` file with ``config.json`` beside it.
    """
    if not path.exists():
        hint = " (a broken symlink)" if path.is_symlink() else ""
        raise CheckpointError(f"{path}: no such file or directory{hint}")
    root = path if path.is_dir() else path.parent
    config = _read_config(root / "config.json")
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise CheckpointError(
            f"{root / 'config.json'}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(LLAMA_FAMILY)}"
        )
    geometry = _geometry(root / "config.json", config)
    entries = _weight_entries(path)
    tensors = _attention_tensors(entries, geometry)
    return Checkpoint(root, config, str(model_type), geometry, tensors)


def _read_config(path: Path) -> dict[str, object]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint directory needs its config.json"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _geometry(path: Path, config: dict[str, object]) -> Geometry:
    def positive(key: str, default: object = None) -> int:
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key!r} must be a positive integer, got {value!r}")
        return value

    layers = positive("num_hidden_layers")
    heads = positive("num_attention_heads")
    hidden = positive("hidden_size")
    kv_heads = positive("num_key_value_heads", heads)
    if config.get("head_dim") is not None:
        head_dim = positive("head_dim")
    elif hidden % heads:
        raise CheckpointError(
            f"{path}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
            "and no head_dim is given"
        )
    else:
        head_dim = hidden // heads
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}"
        )
    return Geometry(layers, heads, kv_heads, head_dim, hidden)


def _weight_entries(path: Path) -> dict[str, TensorEntry]:
    if path.is_file():
        return read_header(path)
    index = path / _INDEX_FILE
    if index.exists():
        return _sharded_entries(index)
    single = path / _SINGLE_FILE
    if single.exists():
        return read_header(single)
    found = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})
    raise CheckpointError(
        f"{path}: no {_SINGLE_FILE} or {_INDEX_FILE}"
        + (f" (found: {', '.join(found)})" if found else " and no weight files at all")
    )


def _sharded_entries(index: Path) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: unreadable index ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
    shards: dict[str, dict[str, TensorEntry]] = {}
    entries: dict[str, TensorEntry] = {}
    for name, shard in weight_map.items():
        shard_path = index.parent / str(shard)
        if shard not in shards:
            if not shard_path.is_file():
                what = "is a broken symlink" if shard_path.is_symlink() else "does not exist"
                raise CheckpointError(f"{index}: shard {shard!r} (for {name!r}) {what}")
            shards[shard] = read_header(shard_path)
        if name not in shards[shard]:
            raise CheckpointError(
                f"{shard_path}: tensor {name!r} promised by {index.name} is missing"
            )
        entries[name] = shards[shard][name]
    return entries


def _attention_tensors(
    entries: dict[str, TensorEntry], geometry: Geometry
) -> dict[tuple[int, str], TensorEntry]:
    prefix = _decoder_prefix(entries)
    tensors: dict[tuple[int, str], TensorEntry] = {}
    for layer in range(geometry.layers):
        for matrix in MATRICES:
            name = prefix + _LLAMA_NAMES[matrix].format(layer=layer)
            entry = entries.get(name)
            if entry is None:
                raise CheckpointError(
                    f"tensor {name!r} is missing from the checkpoint (config.json says "
                    f"num_hidden_layers={geometry.layers})"
                )
            expected = geometry.expected_shape(matrix)
            if entry.shape != expected:
                raise CheckpointError(
                    f"{entry.file}: tensor {name!r} has shape {list(entry.shape)} but config.json "
                    f"implies {list(expected)} ({_shape_reason(matrix, geometry)})"
                )
            if entry.dtype not in DTYPE_SIZES:
                raise CheckpointError(
                    f"{entry.file}: tensor {name!r} has dtype {entry.dtype}; only "
                    f"{', '.join(DTYPE_SIZES)} weights can be analysed (quantized weights are not)"
                )
            tensors[(layer, matrix)] = entry
    return tensors


def _decoder_prefix(entries: dict[str, TensorEntry]) -> str:
    """The name prefix of the decoder layers (``model.`` in HF checkpoints, sometimes none)."""
    pattern = re.compile(r"^(.*?)layers\.0\.self_attn\.q_proj\.weight$")
    prefixes = sorted(m.group(1) for name in entries if (m := pattern.match(name)))
    if not prefixes:
        raise CheckpointError(
            "no tensor named like '...layers.0.self_attn.q_proj.weight': "
            "not a Llama-layout checkpoint"
        )
    return prefixes[0]


def _shape_reason(matrix: str, g: Geometry) -> str:
    heads = "num_key_value_heads" if matrix in ("k", "v") else "num_attention_heads"
    count = g.distinct_heads(matrix)
    return f"{heads}={count} x head_dim={g.head_dim}, hidden_size={g.hidden}"
