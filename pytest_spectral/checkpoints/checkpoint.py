"""Locating a checkpoint's attention weights from ``config.json`` and the weight files' headers.

Nothing here reads a weight: opening a safetensors checkpoint costs a few small reads, so every
pytest worker can do it at collection time. Shapes are checked against the config up front, so
a mismatch is a usage error before the first item runs rather than a crash in the middle.
``pytorch_model.bin`` checkpoints (no safetensors) are opened with
``torch.load(mmap=True, weights_only=True)``, which maps the file without reading the data.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.checkpoints.architectures import (
    SUPPORTED_MODEL_TYPES,
    ArchitectureError,
    Family,
    Variant,
    family_for,
)
from pytest_spectral.checkpoints.safetensors_header import DTYPE_SIZES, TensorEntry, read_header
from pytest_spectral.errors import CheckpointError

MATRICES: tuple[str, ...] = ("q", "k", "v", "o")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_BIN_INDEX_FILE = "pytorch_model.bin.index.json"
_BIN_FILE = "pytorch_model.bin"


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

    def slice_shape(self, matrix: str) -> tuple[int, int]:
        """Shape ``[m, n]`` of one head's block in ``nn.Linear`` orientation (out x in)."""
        return (self.hidden, self.head_dim) if matrix == "o" else (self.head_dim, self.hidden)


@dataclass(frozen=True)
class Layout:
    """How the weights of this checkpoint are stored: fused Q/K/V or not, transposed or not."""

    family: str
    fused: str | None
    conv1d: bool


@dataclass(frozen=True)
class Checkpoint:
    """A readable checkpoint: its config, geometry and where each attention weight lives."""

    root: Path
    config: Mapping[str, object]
    model_type: str
    geometry: Geometry
    layout: Layout
    #: (layer, matrix) -> tensor, for q, k, v, o and the MLP matrices present
    tensors: dict[tuple[int, str], TensorEntry]
    #: MLP matrices the checkpoint has (whole-matrix items only)
    mlp: tuple[str, ...] = ()

    @property
    def dtype(self) -> str:
        """The storage dtype of the attention weights (the most common one if mixed)."""
        return Counter(t.dtype for t in self.tensors.values()).most_common(1)[0][0]

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def item_shape(self, matrix: str, *, whole: bool) -> tuple[int, int]:
        """Shape ``[m, n]`` of an item's matrix in ``nn.Linear`` orientation (out x in)."""
        g = self.geometry
        if not whole:
            return g.slice_shape(matrix)
        if matrix in MATRICES:
            return (
                (g.hidden, g.heads * g.head_dim)
                if matrix == "o"
                else (
                    g.distinct_heads(matrix) * g.head_dim,
                    g.hidden,
                )
            )
        rows, cols = self.tensors[(0, matrix)].shape
        return (cols, rows) if self.layout.conv1d else (rows, cols)


def open_checkpoint(
    path: Path, *, config_path: Path | None = None, family: Family | None = None
) -> Checkpoint:
    """Read the config and the weight headers of the checkpoint at ``path``.

    ``path`` is a directory, or a single weight file with ``config.json`` beside it (or given
    as ``config_path``). ``family`` describes an architecture the plugin does not know.
    """
    if not path.exists():
        hint = " (a broken symlink)" if path.is_symlink() else ""
        raise CheckpointError(f"{path}: no such file or directory{hint}")
    root = path if path.is_dir() else path.parent
    config_file = config_path or root / "config.json"
    config = _text_config(_read_config(config_file))
    model_type = str(config.get("model_type"))
    if family is None:
        family = family_for(config.get("model_type"))
    if family is None:
        raise CheckpointError(
            f"{config_file}: model_type {config.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}. Describe its layout with "
            "--spectral-architecture FILE.toml (see the README)"
        )
    try:
        variant = family.layout_of(config)
    except ArchitectureError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    geometry = _geometry(config_file, config, family, variant)
    layout = Layout(family.name, variant.fused, family.conv1d)
    entries = _weight_entries(path)
    prefix = _decoder_prefix(entries, family)
    tensors = _attention_tensors(entries, prefix, family, geometry, layout)
    mlp = _mlp_tensors(entries, prefix, family, geometry)
    tensors.update(mlp)
    names = tuple(dict.fromkeys(matrix for _, matrix in mlp))
    return Checkpoint(root, config, model_type, geometry, layout, tensors, names)


def _read_config(path: Path) -> dict[str, object]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint directory needs its config.json "
            "(for a single weight file elsewhere, give --spectral-config)"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def _text_config(config: dict[str, object]) -> dict[str, object]:
    """Multimodal wrappers (LLaVA and the like) describe their text decoder in text_config."""
    text = config.get("text_config")
    if isinstance(text, dict) and family_for(config.get("model_type")) is None:
        return text
    return config


def _geometry(
    path: Path, config: Mapping[str, object], family: Family, variant: Variant
) -> Geometry:
    def value(keys: tuple[str, ...], default: object = None) -> tuple[str, object]:
        for key in keys:
            if config.get(key) is not None:
                return key, config[key]
        return (keys[0] if keys else "?"), default

    def positive(keys: tuple[str, ...], default: object = None) -> int:
        key, number = value(keys, default)
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise CheckpointError(f"{path}: {key!r} must be a positive integer, got {number!r}")
        return number

    layers = positive(family.layers_keys)
    heads = positive(family.heads_keys)
    hidden = positive(family.hidden_keys)
    kv_heads = variant.kv_heads or positive(variant.kv_heads_keys, heads)
    if value(family.head_dim_keys)[1] is not None:
        head_dim = positive(family.head_dim_keys)
    elif hidden % heads:
        raise CheckpointError(
            f"{path}: hidden size {hidden} is not divisible by {heads} attention heads "
            "and no head_dim is given"
        )
    else:
        head_dim = hidden // heads
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: {heads} attention heads is not a multiple of {kv_heads} key/value heads"
        )
    return Geometry(layers, heads, kv_heads, head_dim, hidden)


def _weight_entries(path: Path) -> dict[str, TensorEntry]:
    if path.is_file():
        return _torch_entries(path) if path.suffix in (".bin", ".pt") else read_header(path)
    for index, reader in ((_INDEX_FILE, read_header), (_BIN_INDEX_FILE, _torch_entries)):
        if (path / index).exists():
            return _sharded_entries(path / index, reader)
    if (path / _SINGLE_FILE).exists():
        return read_header(path / _SINGLE_FILE)
    if (path / _BIN_FILE).exists():
        return _torch_entries(path / _BIN_FILE)
    found = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})
    raise CheckpointError(
        f"{path}: no {_SINGLE_FILE}, {_INDEX_FILE}, {_BIN_FILE} or {_BIN_INDEX_FILE}"
        + (f" (found: {', '.join(found)})" if found else " and no weight files at all")
    )


def _sharded_entries(
    index: Path, reader: Callable[[Path], dict[str, TensorEntry]]
) -> dict[str, TensorEntry]:
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
            shards[shard] = reader(shard_path)
        if name not in shards[shard]:
            raise CheckpointError(
                f"{shard_path}: tensor {name!r} promised by {index.name} is missing"
            )
        entries[name] = shards[shard][name]
    return entries


def _torch_entries(path: Path) -> dict[str, TensorEntry]:
    """Names, dtypes and shapes from a ``torch.save`` file, mapped rather than read."""
    from pytest_spectral.checkpoints.reader import load_torch_file

    try:
        state = load_torch_file(path)
    except Exception as exc:  # torch raises many types for a corrupt or unsafe file
        raise CheckpointError(
            f"{path}: cannot load with torch.load(weights_only=True, mmap=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    size = path.stat().st_size
    entries = {}
    for name, tensor in state.items():
        if hasattr(tensor, "shape") and hasattr(tensor, "dtype"):
            dtype = _TORCH_DTYPE_NAMES.get(
                str(tensor.dtype), str(tensor.dtype).removeprefix("torch.")
            )
            entries[name] = TensorEntry(path, name, dtype, tuple(tensor.shape), -1, size, "")
    return entries


_TORCH_DTYPE_NAMES = {
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.float32": "F32",
    "torch.float64": "F64",
}


def _attention_tensors(
    entries: Mapping[str, TensorEntry],
    prefix: str,
    family: Family,
    geometry: Geometry,
    layout: Layout,
) -> dict[tuple[int, str], TensorEntry]:
    tensors: dict[tuple[int, str], TensorEntry] = {}
    for layer in range(geometry.layers):
        for matrix in MATRICES:
            name = prefix + family.tensor_name(layer, matrix)
            entry = entries.get(name)
            if entry is None:
                raise CheckpointError(
                    _quantized(name, entries)
                    or f"tensor {name!r} is missing from the checkpoint "
                    f"(the config says {geometry.layers} layers)"
                )
            expected = expected_shape(matrix, geometry, layout)
            if entry.shape != expected:
                raise CheckpointError(
                    f"{entry.file}: tensor {name!r} has shape {list(entry.shape)} but the config "
                    f"implies {list(expected)} ({_shape_reason(matrix, geometry, layout)})"
                )
            if entry.dtype not in DTYPE_SIZES:
                raise CheckpointError(
                    f"{entry.file}: tensor {name!r} has dtype {entry.dtype}; only "
                    f"{', '.join(DTYPE_SIZES)} weights can be analysed (dequantize first)"
                )
            tensors[(layer, matrix)] = entry
    return tensors


def _mlp_tensors(
    entries: Mapping[str, TensorEntry], prefix: str, family: Family, geometry: Geometry
) -> dict[tuple[int, str], TensorEntry]:
    """The MLP matrices present in every layer (a mixture of experts has none of them)."""
    found: dict[tuple[int, str], TensorEntry] = {}
    for matrix in family.mlp:
        names = [prefix + family.tensor_name(layer, matrix) for layer in range(geometry.layers)]
        if names[0] not in entries:
            continue
        for layer, name in enumerate(names):
            entry = entries.get(name)
            if entry is None:
                raise CheckpointError(f"tensor {name!r} is missing (layer 0 has its {matrix})")
            if len(entry.shape) != 2 or entry.dtype not in DTYPE_SIZES:
                raise CheckpointError(
                    f"{entry.file}: tensor {name!r} ({entry.dtype} {list(entry.shape)}) is not a "
                    f"2-D {', '.join(DTYPE_SIZES)} matrix"
                )
            found[(layer, matrix)] = entry
    return found


def expected_shape(matrix: str, g: Geometry, layout: Layout) -> tuple[int, int]:
    """The stored shape of the tensor holding ``matrix`` (the fused one for fused Q/K/V)."""
    if matrix == "o":
        out_in = (g.hidden, g.heads * g.head_dim)
    elif layout.fused:
        out_in = ((g.heads + 2 * g.kv_heads) * g.head_dim, g.hidden)
    else:
        out_in = (g.distinct_heads(matrix) * g.head_dim, g.hidden)
    return (out_in[1], out_in[0]) if layout.conv1d else out_in


def _quantized(name: str, entries: Mapping[str, TensorEntry]) -> str | None:
    """The error for a weight stored GPTQ/AWQ-packed as ``.qweight``, if it is."""
    stem = name.removesuffix(".weight")
    if f"{stem}.qweight" not in entries:
        return None
    return (
        f"tensor {name!r} is stored quantized ({stem}.qweight, GPTQ/AWQ packed); "
        "quantized checkpoints cannot be analysed: dequantize first"
    )


def _decoder_prefix(entries: Mapping[str, TensorEntry], family: Family) -> str:
    """The name prefix of the text decoder's layers (``model.``, ``transformer.``, none...).

    Multimodal checkpoints also hold a vision tower; a prefix naming the language model wins,
    then the shortest.
    """
    first = re.escape(family.tensor_name(0, "q"))
    pattern = re.compile(rf"^(.*?){first}$")
    prefixes = [m.group(1) for name in entries if (m := pattern.match(name))]
    if not prefixes:
        quantized = first.removesuffix(re.escape(".weight")) + re.escape(".qweight")
        packed = next((n for n in entries if re.match(rf"^.*?{quantized}$", n)), None)
        if packed is not None:
            raise CheckpointError(
                str(_quantized(packed.removesuffix("qweight") + "weight", entries))
            )
        raise CheckpointError(
            f"no tensor named like '...{family.tensor_name(0, 'q')}': this checkpoint does not "
            f"have the {family.name} layout its config.json announces"
        )
    return min(prefixes, key=lambda p: ("language_model" not in p, len(p), p))


def _shape_reason(matrix: str, g: Geometry, layout: Layout) -> str:
    if matrix == "o":
        detail = f"hidden size {g.hidden}, {g.heads} heads x head_dim {g.head_dim}"
    elif layout.fused:
        detail = f"fused q/k/v: ({g.heads} + 2 x {g.kv_heads}) heads x head_dim {g.head_dim}"
    else:
        count = g.distinct_heads(matrix)
        detail = (
            f"{count} {'key/value' if matrix in 'kv' else 'query'} heads x head_dim {g.head_dim}"
        )
    return detail + (", stored transposed (Conv1D)" if layout.conv1d else "")
