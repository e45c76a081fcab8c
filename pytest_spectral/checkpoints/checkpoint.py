"""Locating a checkpoint's attention weights from ``config.json`` and the weight files' headers.

Nothing here reads a weight: opening a checkpoint costs a few small reads, so every pytest
worker can do it at collection time. The tensors a run will read are checked against the config
before the first item runs (:meth:`Checkpoint.check_readable`), so a mismatch is a usage error
rather than a crash in the middle, and a tensor the run never reads cannot refuse it.

Nothing in a checkpoint is trusted: files are read through :mod:`pytest_spectral.untrusted`
(regular files only, size-capped), shards named by an index must lie inside the checkpoint
directory (or, for a hub snapshot, in its repository's ``blobs/``), each physical file's header
is parsed once however many spellings the index uses, all headers together are capped at
:data:`MAX_TOTAL_HEADER_BYTES`, and a config whose geometry would turn a small file into an
absurd number of items is refused (:data:`SMALL_MODEL_ITEMS`, :data:`MIN_WEIGHTS_PER_ITEM`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.checkpoints.architectures import (
    SUPPORTED_MODEL_TYPES,
    ArchitectureError,
    Family,
    Variant,
    family_for,
)
from pytest_spectral.checkpoints.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    TensorEntry,
    WeightFile,
    read_header,
)
from pytest_spectral.checkpoints.torch_file import read_torch_file
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import (
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    MiB,
    MissingFileError,
    UntrustedFileError,
    check_regular,
    load_json,
)

MATRICES: tuple[str, ...] = ("q", "k", "v", "o")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
_BIN_INDEX_FILE = "pytorch_model.bin.index.json"
_BIN_FILE = "pytorch_model.bin"
#: All weight-file headers of one checkpoint together (safetensors JSON, torch.save pickles).
#: About 120 bytes per tensor: the largest mixtures of experts (a trillion parameters, 140,000
#: tensors) have under 20 MB; parsing 32 MiB of hostile headers takes a few seconds.
MAX_TOTAL_HEADER_BYTES = 32 * MiB
#: Any geometry may have up to this many head items (4 per query head and layer)...
SMALL_MODEL_ITEMS = 4096
#: ...beyond it, each item must stand for at least this many attention weights on average, so
#: that the item count grows with the bytes: a tiny file cannot make 80,000 items. Real models
#: with that many items have over 8,000 weights per item (Llama-3-8B: 262,144).
MIN_WEIGHTS_PER_ITEM = 1024
#: A head slice is at least this many rows and columns (head_dim, hidden size): a 1 x n slice
#: has a single singular value, and nothing to measure.
MIN_SLICE_SIDE = 2


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

    def check_readable(self, keys: Iterable[tuple[int, str]]) -> None:
        """Refuse what a run would read but could not analyse, naming the tensor.

        Only the tensors of ``keys`` ((layer, matrix) pairs) are checked, so a tensor no item
        reads (an int8 MLP matrix in a head-scope run) cannot refuse the run.
        Raises :class:`CheckpointError`.
        """
        for layer, matrix in dict.fromkeys(keys):
            problem = self._unreadable(matrix, self.tensors[(layer, matrix)])
            if problem is not None:
                raise CheckpointError(problem)

    def _unreadable(self, matrix: str, entry: TensorEntry) -> str | None:
        where = f"{entry.file}: tensor {entry.name!r}"
        if entry.dtype not in DTYPE_SIZES:
            return (
                f"{where} has dtype {entry.dtype}; only {', '.join(DTYPE_SIZES)} weights can be "
                "analysed (dequantize first)"
            )
        if entry.problem:
            return f"{where} {entry.problem}"
        if matrix in MATRICES:
            expected = expected_shape(matrix, self.geometry, self.layout)
            if entry.shape != expected:
                return (
                    f"{where} has shape {list(entry.shape)} but the config implies "
                    f"{list(expected)} ({_shape_reason(matrix, self.geometry, self.layout)})"
                )
        elif len(entry.shape) != 2 or 0 in entry.shape:
            return f"{where} has shape {list(entry.shape)}; a whole-matrix item needs a 2-D matrix"
        return None


def open_checkpoint(
    path: Path, *, config_path: Path | None = None, family: Family | None = None
) -> Checkpoint:
    """Read the config and the weight headers of the checkpoint at ``path``.

    ``path`` is a directory, or a single weight file with ``config.json`` beside it (or given
    as ``config_path``). ``family`` describes an architecture the plugin does not know.
    """
    if not path.is_dir():
        try:
            check_regular(path)
        except UntrustedFileError as exc:
            raise CheckpointError(str(exc)) from None
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
            "--spectral-architecture=FILE.toml (see the README)"
        )
    try:
        variant = family.layout_of(config)
    except ArchitectureError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    geometry = _geometry(config_file, config, family, variant)
    layout = Layout(family.name, variant.fused, family.conv1d)
    entries = _weight_entries(path, _needed_names(family))
    prefix = _decoder_prefix(entries, family)
    tensors = _attention_tensors(entries, prefix, family, geometry)
    mlp = _mlp_tensors(entries, prefix, family, geometry)
    tensors.update(mlp)
    names = tuple(dict.fromkeys(matrix for _, matrix in mlp))
    return Checkpoint(root, config, model_type, geometry, layout, tensors, names)


def _read_config(path: Path) -> dict[str, object]:
    try:
        config = load_json(path, MAX_CONFIG_BYTES, "config")
    except MissingFileError:
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint directory needs its config.json "
            "(for a single weight file elsewhere, give --spectral-config)"
        ) from None
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
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
    geometry = Geometry(layers, heads, kv_heads, head_dim, hidden)
    keys = {  # the config keys each value came from, for messages
        "layers": value(family.layers_keys)[0],
        "heads": value(family.heads_keys)[0],
        "hidden": value(family.hidden_keys)[0],
        "head_dim": value(family.head_dim_keys)[0],
    }
    if value(family.head_dim_keys)[1] is None:
        keys["head_dim"] = f"{keys['hidden']} / {keys['heads']}"
    _check_plausible(path, geometry, keys)
    return geometry


def _check_plausible(path: Path, g: Geometry, keys: Mapping[str, str]) -> None:
    """Refuse geometries that make a small file into a flood of items (see the constants)."""
    for side, key in ((g.head_dim, "head_dim"), (g.hidden, "hidden")):
        if side < MIN_SLICE_SIDE:
            raise CheckpointError(
                f"{path}: {keys[key]!r} gives {side}; a head slice must be at least "
                f"{MIN_SLICE_SIDE} x {MIN_SLICE_SIDE} (head_dim x hidden size) to have a spectrum"
            )
    items = 4 * g.heads * g.layers
    weights = g.layers * (2 * g.heads + 2 * g.kv_heads) * g.head_dim * g.hidden
    if items > SMALL_MODEL_ITEMS and weights < items * MIN_WEIGHTS_PER_ITEM:
        raise CheckpointError(
            f"{path}: {keys['heads']!r} {g.heads} x {keys['layers']!r} {g.layers} would make "
            f"{items} head items of only {weights // items} attention weights each "
            f"({keys['head_dim']!r} {g.head_dim} x {keys['hidden']!r} {g.hidden}); beyond "
            f"{SMALL_MODEL_ITEMS} items each must stand for at least {MIN_WEIGHTS_PER_ITEM} "
            "weights (real checkpoints have thousands): an implausible config, refused"
        )


def _needed_names(family: Family) -> Callable[[str], bool]:
    """Whether a tensor name may be one the checkpoint needs: a layer's attention or MLP
    tensor, or its GPTQ/AWQ ``.qweight`` (for the message saying it is quantized).

    Only those entries of a header are kept, so a header of a million junk entries costs its
    parse and nothing more.
    """
    templates = [family.layer + name for name in family.tensors.values()]
    templates += [family.mlp_prefix + name for name in family.mlp.values()]
    tails = [template.split("{layer}", 1)[1] for template in templates]
    tails += [t.removesuffix(".weight") + ".qweight" for t in tails if t.endswith(".weight")]
    suffixes = tuple(tails)
    return lambda name: name.endswith(suffixes)


def _weight_entries(path: Path, wanted: Callable[[str], bool]) -> dict[str, TensorEntry]:
    """The tensors of the checkpoint at ``path`` (a directory, or a single weight file) whose
    names are ``wanted``."""
    if not path.is_dir():
        return _read_weight_file(path, MAX_TOTAL_HEADER_BYTES, wanted).entries
    for name, reader in ((_INDEX_FILE, read_header), (_BIN_INDEX_FILE, read_torch_file)):
        if os.path.lexists(path / name):
            return _sharded_entries(path / name, reader, wanted)
    for name in (_SINGLE_FILE, _BIN_FILE):
        if os.path.lexists(path / name):
            _check_regular_inside(path, path / name, str(path / name))
            return _read_weight_file(path / name, MAX_TOTAL_HEADER_BYTES, wanted).entries
    found = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})
    raise CheckpointError(
        f"{path}: no {_SINGLE_FILE}, {_INDEX_FILE}, {_BIN_FILE} or {_BIN_INDEX_FILE}"
        + (f" (found: {', '.join(found)})" if found else " and no weight files at all")
    )


def _read_weight_file(path: Path, budget: int, wanted: Callable[[str], bool]) -> WeightFile:
    if path.suffix in (".bin", ".pt"):
        return read_torch_file(path, budget, wanted)
    return read_header(path, min(budget, MAX_HEADER_BYTES), wanted)


def _sharded_entries(
    index: Path,
    reader: Callable[[Path, int, Callable[[str], bool]], WeightFile],
    wanted: Callable[[str], bool],
) -> dict[str, TensorEntry]:
    """The tensors listed in ``index``, each physical shard read once.

    Every shard name is checked; shards holding ``wanted`` tensors are read, deduplicated by
    normalised name (``x``, ``./x``, ``.//x``) and by file identity (hard and symbolic links),
    their headers counted against one total budget.
    """
    try:
        document = load_json(index, MAX_INDEX_BYTES, "weight index")
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
    by_name: dict[str, WeightFile] = {}
    by_identity: dict[tuple[int, int], WeightFile] = {}
    budget = MAX_TOTAL_HEADER_BYTES
    entries: dict[str, TensorEntry] = {}
    paths: dict[str, Path] = {}
    for name, shard in weight_map.items():
        shard_path = paths.get(shard) if isinstance(shard, str) else None
        if shard_path is None:
            shard_path = paths[shard] = _shard_path(index, name, shard)
        if not wanted(name):
            continue  # never read: only its shard's name is checked
        weight_file = by_name.get(str(shard_path))
        if weight_file is None:
            identity = _file_key(shard_path)
            weight_file = by_identity.get(identity)
            if weight_file is None:
                weight_file = reader(shard_path, min(budget, MAX_HEADER_BYTES), wanted)
                budget -= weight_file.header_bytes
                by_identity[identity] = weight_file
            by_name[str(shard_path)] = weight_file
        entry = weight_file.entries.get(name)
        if entry is None:
            raise CheckpointError(
                f"{shard_path}: tensor {name!r} promised by {index.name} is missing"
            )
        entries[name] = entry
    return entries


def _file_key(path: Path) -> tuple[int, int]:
    """Device and inode: the same physical file under any name or link."""
    try:
        status = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return status.st_dev, status.st_ino


def _shard_path(index: Path, tensor: str, shard: object) -> Path:
    """The shard an index names, refused unless it is a regular file inside the checkpoint."""
    where = f"{index}: shard {shard!r} (for {tensor!r})"
    if not isinstance(shard, str) or not shard or "\0" in shard:
        raise CheckpointError(f"{where} is not a file name")
    if os.path.isabs(shard):
        raise CheckpointError(f"{where} is an absolute path; shards must lie in the checkpoint")
    normal = os.path.normpath(shard)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise CheckpointError(f"{where} leaves the checkpoint directory ('..'); refused")
    path = index.parent / normal
    _check_regular_inside(index.parent, path, where)
    return path


def _check_regular_inside(root: Path, path: Path, where: str) -> None:
    """Refuse a weight file that is not a regular file, or whose real location (symlinks
    resolved) is outside ``root``; ``where`` starts the message.

    A Hugging Face cache snapshot holds symlinks into its repository's ``blobs/`` folder:
    exactly that folder is allowed too.
    """
    try:
        check_regular(path)
    except UntrustedFileError as exc:
        raise CheckpointError(f"{where}: {str(exc).removeprefix(f'{path}: ')}") from None
    real = os.path.realpath(path)
    allowed = [os.path.realpath(root)]
    allowed.extend(hub_blobs(Path(allowed[0])))
    if not any(os.path.commonpath([real, place]) == place for place in allowed):
        raise CheckpointError(
            f"{where}: resolves to {real}, outside the checkpoint directory; refused (copy the "
            "file into the checkpoint, or pass a single weight file itself as --spectral-model)"
        )


def hub_blobs(root: Path) -> list[str]:
    """The ``blobs/`` folder of the hub cache repository ``root`` is a snapshot of, if any."""
    for folder in (root, *root.parents):
        parent = folder.parent
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            return [str(parent.parent / "blobs")]
    return []


def _attention_tensors(
    entries: Mapping[str, TensorEntry], prefix: str, family: Family, geometry: Geometry
) -> dict[tuple[int, str], TensorEntry]:
    """The Q/K/V/O tensor of every layer; what they hold is checked when a run needs them."""
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
            tensors[(layer, matrix)] = entry
    return tensors


def _mlp_tensors(
    entries: Mapping[str, TensorEntry], prefix: str, family: Family, geometry: Geometry
) -> dict[tuple[int, str], TensorEntry]:
    """The MLP matrices present in every layer (a mixture of experts has none of them)."""
    found: dict[tuple[int, str], TensorEntry] = {}
    for matrix in family.mlp:
        if prefix + family.tensor_name(0, matrix) not in entries:
            continue
        for layer in range(geometry.layers):
            name = prefix + family.tensor_name(layer, matrix)
            entry = entries.get(name)
            if entry is None:
                raise CheckpointError(f"tensor {name!r} is missing (layer 0 has its {matrix})")
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
