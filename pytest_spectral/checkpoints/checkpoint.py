"""Locating a checkpoint's attention weights from its config and its weight files' headers.

A format (:mod:`pytest_spectral.checkpoints.formats`) gives the config and the tensors in
Hugging Face terms; this module finds the family, the head geometry and each layer's Q, K, V,
O (and MLP) tensors among them. Nothing here reads a weight: opening a checkpoint costs a few
small reads, so every pytest worker can do it at collection time. The tensors a run will read
are checked against the config before the first item runs (:meth:`Checkpoint.check_readable`),
so a mismatch is a usage error rather than a crash in the middle, and a tensor the run never
reads cannot refuse it.

Nothing in a checkpoint is trusted: the formats read files through
:mod:`pytest_spectral.untrusted` (regular files only, size-capped, confined to the checkpoint,
headers parsed once and capped in total), and a config whose geometry would turn a small file
into an absurd number of items is refused (:data:`SMALL_MODEL_ITEMS`,
:data:`MIN_WEIGHTS_PER_ITEM`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from pytest_spectral.checkpoints.families import (
    GENERIC,
    NO_ATTENTION,
    NOT_YET,
    SUPPORTED_MODEL_TYPES,
    ArchitectureError,
    Family,
    Latent,
    Variant,
    text_model,
)
from pytest_spectral.checkpoints.families.family import FUSED_MATRICES, LATENT_MATRICES
from pytest_spectral.checkpoints.formats import ReadOptions, open_format
from pytest_spectral.checkpoints.formats.base import TensorMap, read_config
from pytest_spectral.checkpoints.formats.sources import TensorSource
from pytest_spectral.errors import CheckpointError

MATRICES: tuple[str, ...] = ("q", "k", "v", "o")
#: Per-head circuits (Elhage et al. 2021, "A Mathematical Framework for Transformer
#: Circuits"): the hidden x hidden products W_Q_h^T W_K_g (what head h attends to) and
#: W_O_h W_V_g (what it writes), g the K/V head that query head h shares. Each is the product
#: of two factors, listed here; their items exist per head, opt-in (--spectral-matrices).
CIRCUITS: dict[str, tuple[str, str]] = {"qk": ("q", "k"), "ov": ("o", "v")}
#: Every matrix a head item can have, in the order items, summaries and panels list them.
HEAD_MATRICES: tuple[str, ...] = MATRICES + tuple(CIRCUITS)
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
    """Head layout of the attention blocks, as ``config.json`` describes it.

    Under multi-head latent attention (``latent`` set) Q, K, V and O slices differ in shape
    (:class:`Latent`) and ``head_dim`` is the query/key head dimension, ``qk_nope_head_dim +
    qk_rope_head_dim`` (transformers' ``qk_head_dim``).
    """

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    latent: Latent | None = None

    @property
    def group_size(self) -> int:
        """Query heads sharing one K/V head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    def kv_head_of(self, head: int) -> int:
        return head // self.group_size

    def distinct_heads(self, matrix: str) -> int:
        """How many different slices ``matrix`` has: one per K/V head for k and v."""
        return self.kv_heads if matrix in ("k", "v") else self.heads

    def head_rows(self, matrix: str) -> int:
        """Rows of one head's Q, K or V slice, columns of its O slice."""
        return self.head_dim if self.latent is None else self.latent.head_rows(matrix)

    def head_input(self, matrix: str) -> int:
        """Columns of one head's Q, K or V slice: the hidden size, or a latent's rank."""
        return self.hidden if self.latent is None else self.latent.head_input(matrix, self.hidden)

    def slice_shape(self, matrix: str) -> tuple[int, int]:
        """Shape ``[m, n]`` of one head's block in ``nn.Linear`` orientation (out x in); a
        circuit (``qk``, ``ov``) is ``hidden x hidden``."""
        if matrix in CIRCUITS:
            return (self.hidden, self.hidden)
        if matrix == "o":
            return (self.hidden, self.head_rows("o"))
        return (self.head_rows(matrix), self.head_input(matrix))


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
    tensors: dict[tuple[int, str], TensorSource]
    #: MLP matrices the checkpoint has (whole-matrix items only)
    mlp: tuple[str, ...] = ()
    #: attention matrices the checkpoint has: all of q, k, v, o (and, under multi-head latent
    #: attention, the whole-matrix-only q_a, kv_a, k_rope), except for a LoRA update, which
    #: has those its adapter targets
    attention: tuple[str, ...] = MATRICES
    #: layers that have them: every layer, except for a LoRA update limited to some layers
    layer_indices: tuple[int, ...] | None = None
    #: lines a run prints in its header: what was assumed about this checkpoint
    notes: tuple[str, ...] = ()

    @property
    def layer_numbers(self) -> tuple[int, ...]:
        """The layers items can be collected for (all of them, unless the checkpoint is an
        update confined to some)."""
        if self.layer_indices is None:
            return tuple(range(self.geometry.layers))
        return self.layer_indices

    @property
    def circuits(self) -> tuple[str, ...]:
        """The circuits whose two factors this checkpoint has (both, except for some LoRA
        updates; none under multi-head latent attention, see :attr:`circuit_refusal`)."""
        if self.circuit_refusal is not None:
            return ()
        return tuple(c for c, pair in CIRCUITS.items() if set(pair) <= set(self.attention))

    @property
    def circuit_refusal(self) -> str | None:
        """Why this checkpoint's heads have no QK/OV circuit items, if they have none by
        design: under multi-head latent attention a head's Q and K act on different latents,
        each rescaled per token by an RMS norm (K's nope part only, not its rope part), so
        its attention score is no fixed bilinear form of the hidden states."""
        if self.geometry.latent is None:
            return None
        return (
            "multi-head latent attention has no qk/ov circuit items: a head's Q acts on the "
            "normalised query latent (q_a_layernorm), its K_nope and V on the normalised "
            "key/value latent (kv_a_layernorm) and its rope key on the hidden state; the RMS "
            "norms rescale each token's latent by its own factor, so a head's score is no "
            "fixed hidden x hidden product (see the README's Supported architectures)"
        )

    def sources(self, layer: int, matrix: str) -> tuple[TensorSource, ...]:
        """The tensors an item of ``matrix`` reads: its own, or a circuit's two factors'
        (one, for both, when Q/K/V are fused)."""
        found = [self.tensors[(layer, name)] for name in CIRCUITS.get(matrix, (matrix,))]
        return tuple({source.key: source for source in found}.values())

    @property
    def dtype(self) -> str:
        """The storage dtype of the attention weights (the most common one if mixed)."""
        return Counter(t.dtype for t in self.tensors.values()).most_common(1)[0][0]

    @property
    def files(self) -> list[Path]:
        """Every file the attention and MLP tensors are read from."""
        return sorted({file for t in self.tensors.values() for file in t.files})

    @property
    def file_names(self) -> list[str]:
        """:attr:`files` relative to the checkpoint's directory; absolute for files outside
        it (a LoRA adapter's base model)."""
        return [
            str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
            for p in self.files
        ]

    def item_shape(self, matrix: str, *, whole: bool) -> tuple[int, int]:
        """Shape ``[m, n]`` of an item's matrix in ``nn.Linear`` orientation (out x in)."""
        g = self.geometry
        if not whole:
            return g.slice_shape(matrix)
        if matrix in MATRICES:
            if matrix == "o":
                return (g.hidden, g.heads * g.head_rows("o"))
            return (g.distinct_heads(matrix) * g.head_rows(matrix), g.head_input(matrix))
        if matrix in LATENT_MATRICES and g.latent is not None:
            start, stop, _ = g.latent.down_rows(matrix)
            return (stop - start, g.hidden)
        rows, cols = self.tensors[(0, matrix)].shape
        return (cols, rows) if self.layout.conv1d else (rows, cols)

    def check_readable(self, keys: Iterable[tuple[int, str]]) -> None:
        """Refuse what a run would read but could not analyse, naming the tensor.

        Only the tensors of ``keys`` ((layer, matrix) pairs) are checked, so a tensor no item
        reads (an int8 MLP matrix in a head-scope run) cannot refuse the run.
        Raises :class:`CheckpointError`.
        """
        for layer, item_matrix in dict.fromkeys(keys):
            for matrix in CIRCUITS.get(item_matrix, (item_matrix,)):
                problem = self._unreadable(matrix, self.tensors[(layer, matrix)])
                if problem is not None:
                    raise CheckpointError(problem)

    def _unreadable(self, matrix: str, entry: TensorSource) -> str | None:
        where = f"{entry.file}: tensor {entry.name!r}"
        if entry.problem:
            return f"{where} {entry.problem}"
        if matrix in MATRICES + LATENT_MATRICES:
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
    path: Path,
    *,
    config_path: Path | None = None,
    family: Family | None = None,
    options: ReadOptions | None = None,
) -> Checkpoint:
    """Read the config and the weight headers of the checkpoint at ``path``.

    ``path`` is a directory or a single weight file in any layout of
    :mod:`pytest_spectral.checkpoints.formats`; ``config_path`` (``--spectral-config``) wins over
    the config the checkpoint carries. ``family`` describes an architecture the plugin does not
    know. Raises :class:`CheckpointError` naming the file, key or tensor.
    """
    options = options or ReadOptions(config=config_path)
    weights = open_format(path, options)
    if options.config is not None:
        config_file, config = options.config, read_config(options.config)
    else:
        config, config_file = weights.config()
    config, family, variant, geometry, notes = interpret_config(config, config_file, family)
    layout = Layout(family.name, variant.fused, family.conv1d)
    entries = weights.tensors(_needed_names(family), geometry.head_dim)
    try:
        prefix = _decoder_prefix(entries, family, partial=weights.partial)
        if weights.partial:
            tensors, attention, layers = _partial_attention(entries, prefix, family, geometry)
        else:
            attention = MATRICES + tuple(m for m in LATENT_MATRICES if m in family.tensors)
            tensors = _attention_tensors(entries, prefix, family, geometry, attention)
            layers = None
    except CheckpointError as exc:  # an undeclared type is refused as such, not for a tensor
        raise (_unsupported(config_file, str(config.get("model_type"))) if notes else exc) from None
    mlp = _mlp_tensors(entries, prefix, family, geometry)
    tensors.update(mlp)
    names = tuple(dict.fromkeys(matrix for _, matrix in mlp))
    return Checkpoint(
        weights.root, config, str(config.get("model_type")), geometry, layout, tensors, names,
        attention, layers, notes,
    )  # fmt: skip


def interpret_config(
    config: Mapping[str, object], config_file: Path, family: Family | None = None
) -> tuple[dict[str, object], Family, Variant, Geometry, tuple[str, ...]]:
    """What ``config`` (from ``config_file``) means, as transformers reads it: the analysed
    model's config with class defaults and aliases applied, its family (``family`` when the
    user described one), layout variant and geometry, and the notes a run prints about it.

    Raises :class:`CheckpointError` naming ``config_file`` and the key.
    """
    config, known = text_model(config)
    model_type = str(config.get("model_type"))
    notes: tuple[str, ...] = ()
    if model_type in NO_ATTENTION:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} has no attention (a state-space or "
            "recurrent model): there are no attention heads to analyse"
        )
    if family is None and model_type in NOT_YET:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} {NOT_YET[model_type]}, which this "
            "version cannot analyse yet; supported: see the README's architecture table"
        )
    if family is None:
        family = known or GENERIC
        if known is None:
            notes = (_generic_note(config_file, model_type),)
    try:
        variant = family.layout_of(config)
        if variant.tensors is not None:  # this config's tensor names (no q_a without q_lora)
            family = replace(family, tensors=variant.tensors)
        geometry = _geometry(config_file, config, family, variant)
    except ArchitectureError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    except CheckpointError as exc:
        raise (_unsupported(config_file, model_type) if notes else exc) from None
    if variant.fused == "interleaved" and geometry.kv_heads != geometry.heads:
        raise CheckpointError(
            f"{config_file}: the interleaved fused layout holds q, k and v of every head in "
            f"turn, so it needs as many key/value heads as query heads; the config gives "
            f"{geometry.kv_heads} key/value heads for {geometry.heads} query heads (for "
            "grouped-query attention, fused = 'grouped' or 'concat' may be the layout)"
        )
    return config, family, variant, geometry, notes


def _generic_note(config_file: Path, model_type: str) -> str:
    """The line a run prints when it reads an undeclared model_type with the common layout."""
    return (
        f"spectral: model_type {model_type!r} ({config_file}) is not one the plugin declares; "
        "its tensors follow layers.N.self_attn.{q,k,v,o}_proj, analysed as the llama layout "
        "(K/V heads from num_key_value_heads, else one per query head; head_dim from "
        "head_dim, else hidden_size / num_attention_heads)"
    )


def _unsupported(config_file: Path, model_type: str) -> CheckpointError:
    return CheckpointError(
        f"{config_file}: model_type {model_type!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}. Describe its layout with "
        "--spectral-architecture FILE.toml (see the README)"
    )


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
    latent = variant.latent
    if latent is not None:  # DeepseekV3Attention's qk_head_dim, whatever head_dim says
        head_dim = latent.qk_nope_head_dim + latent.qk_rope_head_dim
    elif value(family.head_dim_keys)[1] is not None:
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
    geometry = Geometry(layers, heads, kv_heads, head_dim, hidden, latent)
    keys = {  # the config keys each value came from, for messages
        "layers": value(family.layers_keys)[0],
        "heads": value(family.heads_keys)[0],
        "hidden": value(family.hidden_keys)[0],
        "head_dim": value(family.head_dim_keys)[0],
    }
    if latent is not None:
        keys["head_dim"] = "qk_nope_head_dim + qk_rope_head_dim"
    elif value(family.head_dim_keys)[1] is None:
        keys["head_dim"] = f"{keys['hidden']} / {keys['heads']}"
    _check_plausible(path, geometry, keys)
    return geometry


def _check_plausible(path: Path, g: Geometry, keys: Mapping[str, str]) -> None:
    """Refuse geometries that make a small file into a flood of items (see the constants)."""
    sides = [(g.head_dim, "head_dim"), (g.hidden, "hidden")]
    if g.latent is not None:
        sides += [(min(g.slice_shape(m)), m) for m in MATRICES]
        keys = {**keys, **{m: f"{m} slice side" for m in MATRICES}}
    for side, key in sides:
        if side < MIN_SLICE_SIDE:
            raise CheckpointError(
                f"{path}: {keys[key]!r} gives {side}; a head slice must be at least "
                f"{MIN_SLICE_SIDE} x {MIN_SLICE_SIDE} (head_dim x hidden size) to have a spectrum"
            )
    items = 4 * g.heads * g.layers
    weights = g.layers * sum(
        g.distinct_heads(m) * g.slice_shape(m)[0] * g.slice_shape(m)[1] for m in MATRICES
    )
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


def _attention_tensors(
    entries: TensorMap,
    prefix: str,
    family: Family,
    geometry: Geometry,
    matrices: tuple[str, ...] = MATRICES,
) -> dict[tuple[int, str], TensorSource]:
    """The tensor of each of ``matrices`` in every layer; what they hold is checked when a
    run needs them."""
    tensors: dict[tuple[int, str], TensorSource] = {}
    for layer in range(geometry.layers):
        for matrix in matrices:
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


def _partial_attention(
    entries: TensorMap, prefix: str, family: Family, geometry: Geometry
) -> tuple[dict[tuple[int, str], TensorSource], tuple[str, ...], tuple[int, ...]]:
    """The attention tensors of an update that covers some matrices of some layers (a LoRA
    adapter's ΔW): items exist for the matrices and layers it covers, which must form a grid
    (every covered layer has every covered matrix), so that each layer has the same items."""
    found = {
        (layer, matrix): entries[name]
        for layer in _named_layers(entries, prefix, family, geometry.layers)
        for matrix in MATRICES
        if (name := prefix + family.tensor_name(layer, matrix)) in entries
    }
    if not found:
        raise CheckpointError(
            "the update holds no attention weight of any layer (its adapter targets none of "
            f"q, k, v, o as the {family.name} layout names them)"
        )
    matrices = tuple(m for m in MATRICES if any(m == matrix for _, matrix in found))
    layers = tuple(sorted({layer for layer, _ in found}))
    for layer in layers:
        for matrix in matrices:
            if (layer, matrix) not in found:
                raise CheckpointError(
                    f"the update covers {matrix} in some layers but not in layer {layer}; "
                    "items need the same matrices in every layer they cover: analyse the merged "
                    "weights instead (--spectral-adapter=merged)"
                )
    return found, matrices, layers


def _named_layers(entries: TensorMap, prefix: str, family: Family, layers: int) -> list[int]:
    """The layers below ``layers`` that tensor names in ``entries`` belong to, read from the
    names: an update's layers may be few and far apart, and trying every layer the config
    claims (``num_hidden_layers = 10**9``) would never end."""
    before, _, after = (prefix + family.layer.format(layer="\0")).partition("\0")
    pattern = re.compile(re.escape(before) + r"(0|[1-9][0-9]{0,17})" + re.escape(after))
    named = {int(m.group(1)) for name in entries if (m := pattern.match(name)) is not None}
    return sorted(layer for layer in named if layer < layers)


def _mlp_tensors(
    entries: TensorMap, prefix: str, family: Family, geometry: Geometry
) -> dict[tuple[int, str], TensorSource]:
    """The MLP matrices present in every layer (a mixture of experts has none of them)."""
    found: dict[tuple[int, str], TensorSource] = {}
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
    """The stored shape of the tensor holding ``matrix`` (the fused one for fused Q/K/V, the
    whole down-projection for a latent one)."""
    fused = _fused_with(matrix, layout)
    if matrix == "o":
        out_in = (g.hidden, g.heads * g.head_rows("o"))
    elif g.latent is not None and matrix in LATENT_MATRICES:
        out_in = (g.latent.down_rows(matrix)[2], g.hidden)
    else:
        rows = sum(g.distinct_heads(m) * g.head_rows(m) for m in fused)
        out_in = (rows, g.head_input(matrix))
    return (out_in[1], out_in[0]) if layout.conv1d else out_in


def _fused_with(matrix: str, layout: Layout) -> str:
    """The matrices stored in one tensor with ``matrix`` (itself included)."""
    together = FUSED_MATRICES.get(layout.fused or "", "")
    return together if matrix in together else matrix


def _quantized(name: str, entries: TensorMap) -> str | None:
    """The error for a weight stored GPTQ/AWQ-packed as ``.qweight``, if it is."""
    stem = name.removesuffix(".weight")
    if f"{stem}.qweight" not in entries:
        return None
    return (
        f"tensor {name!r} is stored quantized ({stem}.qweight, GPTQ/AWQ packed); "
        "quantized checkpoints cannot be analysed: dequantize first"
    )


def _decoder_prefix(entries: TensorMap, family: Family, *, partial: bool = False) -> str:
    """The name prefix of the text decoder's layers (``model.``, ``transformer.``, none...).

    Multimodal checkpoints also hold a vision tower; a prefix naming the language model wins,
    then the shortest. The first layer's Q weight shows it; for a ``partial`` update (which
    may lack both), any attention weight of any layer.
    """
    first = re.escape(family.tensor_name(0, "q"))
    if partial:  # any layer number, any attention matrix
        sentinel = 987654321
        names = [re.escape(family.tensor_name(sentinel, m)) for m in MATRICES]
        first = "(?:" + "|".join(names).replace(str(sentinel), r"\d+") + ")"
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
    if g.latent is not None:
        return _latent_shape_reason(matrix, g)
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


def _latent_shape_reason(matrix: str, g: Geometry) -> str:
    """The config values a multi-head latent attention tensor's shape follows from."""
    latent: Latent = g.latent  # type: ignore[assignment]
    nope, rope, v = latent.qk_nope_head_dim, latent.qk_rope_head_dim, latent.v_head_dim
    q_input = (
        f"q_lora_rank {latent.q_lora_rank}"
        if latent.q_lora_rank is not None
        else f"hidden size {g.hidden}"
    )
    return {
        "q": f"{g.heads} heads x (qk_nope_head_dim {nope} + qk_rope_head_dim {rope}), {q_input}",
        "k": f"{g.heads} heads x (qk_nope_head_dim {nope} + v_head_dim {v}), "
        f"kv_lora_rank {latent.kv_lora_rank}",
        "o": f"hidden size {g.hidden}, {g.heads} heads x v_head_dim {v}",
        "q_a": f"q_lora_rank {latent.q_lora_rank}, hidden size {g.hidden}",
        "kv_a": f"kv_lora_rank {latent.kv_lora_rank} + qk_rope_head_dim {rope}, "
        f"hidden size {g.hidden}",
    }[{"v": "k", "k_rope": "kv_a"}.get(matrix, matrix)]
