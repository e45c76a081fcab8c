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
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from pytest_spectral.checkpoints.families import (
    GENERIC,
    MLP_MATRICES,
    NO_ATTENTION,
    SUPPORTED_MODEL_TYPES,
    VISION,
    WRAPPERS,
    ArchitectureError,
    ExpertMatrix,
    Family,
    Latent,
    Moe,
    Variant,
    expert_item,
    matrix_kind,
    printable_type,
    text_model,
    vision_model,
)
from pytest_spectral.checkpoints.families.family import (
    FUSED_MATRICES,
    LATENT_MATRICES,
    tensor_key,
)
from pytest_spectral.checkpoints.families.moe import SparseLayout, expert_counts
from pytest_spectral.checkpoints.formats import ReadOptions, open_format
from pytest_spectral.checkpoints.formats.base import TensorMap, read_config
from pytest_spectral.checkpoints.formats.sources import TensorSource
from pytest_spectral.errors import CheckpointError

#: words that name a vision tower in tensor names (LLaVA's ``vision_tower.``, Qwen's ``visual.``)
VISION_WORDS = ("vision", "visual")
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
class StackSpan:
    """One stack among the checkpoint's blocks (an encoder-decoder model's, or a multimodal
    wrapper's vision tower): its layers are blocks ``start`` to ``start + layers - 1``.

    A stack with heads of its own (the vision tower) has its own ``geometry`` and ``layout``;
    an encoder-decoder model's stacks share the checkpoint's (``None``).
    """

    name: str
    start: int
    layers: int
    geometry: Geometry | None = None
    layout: Layout | None = None


@dataclass(frozen=True)
class ExpertTensors:
    """One kind of expert matrix (gate, up or down) of one sparse layer: every expert's,
    read and decomposed as one unit (one item per expert)."""

    matrix: ExpertMatrix
    #: the 3-D tensor holding every expert, or one 2-D tensor per expert in expert order
    sources: tuple[TensorSource, ...]

    @property
    def count(self) -> int:
        """How many experts (items) the layer has."""
        if self.matrix.per_expert:
            return len(self.sources)
        shape = self.sources[0].shape
        return shape[0] if len(shape) == 3 else 1

    @property
    def shape(self) -> tuple[int, int]:
        """``[out, in]`` of one expert's matrix, in ``nn.Linear`` orientation."""
        rows, cols = self.sources[0].shape[-2:]
        out, inputs = (cols, rows) if self.matrix.transposed else (rows, cols)
        return (out // 2 if self.matrix.part is not None else out), inputs

    def problem(self) -> str | None:
        """Why these tensors cannot be read as experts (naming the tensor), or ``None``."""
        first = self.sources[0]
        where = f"{first.file}: tensor {first.name!r}"
        dims = 2 if self.matrix.per_expert else 3
        for source in self.sources:
            if source.problem:
                return f"{source.file}: tensor {source.name!r} {source.problem}"
            if len(source.shape) != dims or 0 in source.shape:
                form = "one expert's 2-D matrix" if dims == 2 else "a 3-D [experts, out, in] tensor"
                return (
                    f"{source.file}: tensor {source.name!r} has shape {list(source.shape)}; "
                    f"expected {form}"
                )
            if source.shape != first.shape:
                return (
                    f"{source.file}: tensor {source.name!r} has shape {list(source.shape)}, "
                    f"expert 0's {first.name!r} {list(first.shape)}: experts of a layer must "
                    "have one shape"
                )
        axis = dims - 1 if self.matrix.transposed else dims - 2
        if self.matrix.part is not None and first.shape[axis] % 2:
            return (
                f"{where} has shape {list(first.shape)}: a fused gate/up tensor needs an even "
                f"size along its output axis ({axis})"
            )
        return None

    def location(self, expert: int) -> str:
        """Where ``expert``'s matrix is stored, for failure messages."""
        if self.matrix.per_expert:
            return self.sources[expert].name
        if self.matrix.part is None:
            return f"{self.sources[0].name}[{expert}]"
        rows, cols = self.sources[0].shape[-2:]
        axis, size = ("last axis", cols) if self.matrix.transposed else ("rows", rows)
        part = self.matrix.part
        span = (
            f"{part}::2"
            if self.matrix.interleaved
            else f"{part * size // 2}:{(part + 1) * size // 2}"
        )
        return f"{self.sources[0].name}[{expert}], {axis} {span}"


@dataclass(frozen=True)
class Checkpoint:
    """A readable checkpoint: its config, geometry and where each attention weight lives."""

    root: Path
    config: Mapping[str, object]
    model_type: str
    #: the analysed model's heads (a multimodal wrapper's text model's); a stack with heads of
    #: its own (the vision tower) has its own: :meth:`geometry_at`, :meth:`layout_at`
    geometry: Geometry
    layout: Layout
    #: (layer, matrix) -> tensor, for q, k, v, o and the MLP matrices each layer has (for
    #: experts, the first tensor of their :attr:`experts`)
    tensors: dict[tuple[int, str], TensorSource]
    #: MLP matrices the checkpoint has in some layer (whole-matrix items only; for experts,
    #: their kinds ``expert-gate``...)
    mlp: tuple[str, ...] = ()
    #: attention matrices the checkpoint has: all of q, k, v, o (and, under multi-head latent
    #: attention, the whole-matrix-only q_a, kv_a, k_rope), except for a LoRA update, which
    #: has those its adapter targets
    attention: tuple[str, ...] = MATRICES
    #: layers that have them: every layer, except for a LoRA update limited to some layers
    layer_indices: tuple[int, ...] | None = None
    #: lines a run prints in its header: what was assumed about this checkpoint
    notes: tuple[str, ...] = ()
    #: an encoder-decoder model's stacks; their layers are numbered on, one after the other,
    #: as the checkpoint's blocks (the first key of :attr:`tensors`), and
    #: :attr:`Geometry.layers` counts all of them. A model of one stack has none: its blocks
    #: are its layers. A multimodal wrapper analysed with its vision tower has one, ``vision``,
    #: after the text model's layers (blocks ``0`` to ``geometry.layers - 1``, in no stack),
    #: with the tower's own geometry and layout.
    stacks: tuple[StackSpan, ...] = ()
    #: (layer, kind) -> the routed experts' matrices of a sparse layer
    experts: Mapping[tuple[int, str], ExpertTensors] = field(default_factory=dict)
    #: the model_type of the multimodal wrapper around the analysed text model, if any
    wrapper: str | None = None
    #: the matrices of the wrapper's vision tower when the checkpoint holds it and this run
    #: does not analyse it (``--spectral-vision`` would); empty otherwise
    unread_tower: tuple[str, ...] = ()

    def geometry_at(self, block: int) -> Geometry:
        """The head geometry of ``block``'s layer: its stack's own (the vision tower's), else
        the checkpoint's."""
        span = self._span(block)
        return self.geometry if span is None or span.geometry is None else span.geometry

    def layout_at(self, block: int) -> Layout:
        """How ``block``'s layer stores its weights: its stack's own layout, else the
        checkpoint's."""
        span = self._span(block)
        return self.layout if span is None or span.layout is None else span.layout

    def _span(self, block: int) -> StackSpan | None:
        return next((s for s in self.stacks if s.start <= block < s.start + s.layers), None)

    @property
    def _unstacked(self) -> int:
        """How many layers are in no stack: all of a model of one stack, those of a
        wrapper's text model beside its vision stack, none of an encoder-decoder model."""
        shared = sum(span.layers for span in self.stacks if span.geometry is None)
        return self.geometry.layers - shared

    @property
    def blocks(self) -> int:
        """How many blocks (layers of every stack) the checkpoint has."""
        own = sum(span.layers for span in self.stacks if span.geometry is not None)
        return self.geometry.layers + own

    def position(self, block: int) -> tuple[str | None, int]:
        """``(stack, layer)`` of a block: the stack's name (``None`` for a model of one stack)
        and the layer's number within it."""
        for span in self.stacks:
            if span.start <= block < span.start + span.layers:
                return span.name, block - span.start
        return None, block

    def block(self, stack: str | None, layer: int) -> int | None:
        """The block of ``layer`` of ``stack``, or ``None`` when the stack has no such layer."""
        if stack is None:
            return layer if 0 <= layer < self._unstacked else None
        span = next((s for s in self.stacks if s.name == stack), None)
        if span is None or not 0 <= layer < span.layers:
            return None
        return span.start + layer

    def stack_layers(self) -> dict[str | None, int]:
        """Layers per stack (the unnamed stack: the layers in none, if any)."""
        unstacked = {None: self._unstacked} if self._unstacked else {}
        return {**unstacked, **{span.name: span.layers for span in self.stacks}}

    def stack_geometries(self) -> dict[str | None, Geometry]:
        """The head geometry of each stack's layers (the unnamed stack's: the checkpoint's)."""
        return {
            stack: self.geometry_at(self.block(stack, 0))  # type: ignore[arg-type]
            for stack in self.stack_layers()
        }

    def own_geometries(self) -> dict[str, dict[str, int]]:
        """The head layout of each stack with heads of its own (a multimodal wrapper's vision
        tower): stack -> config key -> value, as a report records it (``model.stack_geometry``)
        and as a baseline or history report must match it."""
        return {
            span.name: {
                "num_hidden_layers": span.geometry.layers,
                "num_attention_heads": span.geometry.heads,
                "num_key_value_heads": span.geometry.kv_heads,
                "head_dim": span.geometry.head_dim,
                "hidden_size": span.geometry.hidden,
            }
            for span in self.stacks
            if span.geometry is not None
        }

    def layer_matrices(self, layer: int, matrices: Iterable[str]) -> list[str]:
        """The item matrices ``layer`` has among ``matrices`` (kinds): each present kind, and
        for an expert kind one name per expert (``expert05-gate``)."""
        names = []
        for kind in matrices:
            experts = self.experts.get((layer, kind))
            if experts is not None:
                names.extend(expert_item(e, kind, self.expert_width) for e in range(experts.count))
            elif (layer, kind) in self.tensors:
                names.append(kind)
        return names

    @cached_property
    def expert_width(self) -> int:
        """Digits of expert numbers in item names (two at least, as for layers and heads)."""
        most = max((e.count for e in self.experts.values()), default=1)
        return max(2, len(str(most - 1)))

    @cached_property
    def _expert_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of each expert kind's matrices, from the first layer that has it."""
        shapes: dict[str, tuple[int, int]] = {}
        for (_, kind), experts in self.experts.items():
            if kind not in shapes:
                shapes[kind] = experts.shape
        return shapes

    @cached_property
    def _whole_shapes(self) -> dict[tuple[str | None, str], tuple[int, int]]:
        """Stored shape of each MLP kind per stack, from the stack's first layer that has
        it (a vision tower's MLP is not its text model's)."""
        shapes: dict[tuple[str | None, str], tuple[int, int]] = {}
        for (block, kind), entry in self.tensors.items():
            key = (self.position(block)[0], kind)
            shapes.setdefault(key, tuple(entry.shape))  # type: ignore[arg-type]
        return shapes

    @property
    def layer_numbers(self) -> tuple[int, ...]:
        """The layers items can be collected for (all of them, unless the checkpoint is an
        update confined to some)."""
        if self.layer_indices is None:
            return tuple(range(self.blocks))
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
        experts = self.experts.get((layer, matrix_kind(matrix)))
        if experts is not None:
            return experts.sources
        found = [self.tensors[(layer, name)] for name in CIRCUITS.get(matrix, (matrix,))]
        return tuple({source.key: source for source in found}.values())

    @property
    def dtype(self) -> str:
        """The storage dtype of the attention weights (the most common one if mixed)."""
        return Counter(t.dtype for t in self.tensors.values()).most_common(1)[0][0]

    @property
    def files(self) -> list[Path]:
        """Every file the attention and MLP tensors are read from."""
        sources = [*self.tensors.values(), *(s for e in self.experts.values() for s in e.sources)]
        return sorted({file for t in sources for file in t.files})

    @property
    def file_names(self) -> list[str]:
        """:attr:`files` relative to the checkpoint's directory; absolute for files outside
        it (a LoRA adapter's base model)."""
        return [
            str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
            for p in self.files
        ]

    def item_shape(self, matrix: str, *, whole: bool, block: int) -> tuple[int, int]:
        """Shape ``[m, n]`` of an item's matrix of ``block`` in ``nn.Linear`` orientation
        (out x in)."""
        g = self.geometry_at(block)
        if not whole:
            return g.slice_shape(matrix)
        if matrix in MATRICES:
            if matrix == "o":
                return (g.hidden, g.heads * g.head_rows("o"))
            return (g.distinct_heads(matrix) * g.head_rows(matrix), g.head_input(matrix))
        if matrix in LATENT_MATRICES and g.latent is not None:
            start, stop, _ = g.latent.down_rows(matrix)
            return (stop - start, g.hidden)
        kind = matrix_kind(matrix)
        if kind in self._expert_shapes:
            return self._expert_shapes[kind]
        rows, cols = self._whole_shapes[(self.position(block)[0], kind)]
        return (cols, rows) if self.layout_at(block).conv1d else (rows, cols)

    def check_readable(self, keys: Iterable[tuple[int, str]]) -> None:
        """Refuse what a run would read but could not analyse, naming the tensor.

        Only the tensors of ``keys`` ((layer, matrix) pairs) are checked, so a tensor no item
        reads (an int8 MLP matrix in a head-scope run) cannot refuse the run.
        Raises :class:`CheckpointError`.
        """
        for layer, item_matrix in dict.fromkeys((layer, matrix_kind(m)) for layer, m in keys):
            experts = self.experts.get((layer, item_matrix))
            if experts is not None:
                if (problem := experts.problem()) is not None:
                    raise CheckpointError(problem)
                continue
            for matrix in CIRCUITS.get(item_matrix, (item_matrix,)):
                problem = self._unreadable(matrix, self.tensors[(layer, matrix)], layer)
                if problem is not None:
                    raise CheckpointError(problem)

    def _unreadable(self, matrix: str, entry: TensorSource, block: int) -> str | None:
        where = f"{entry.file}: tensor {entry.name!r}"
        if entry.problem:
            return f"{where} {entry.problem}"
        if matrix in MATRICES + LATENT_MATRICES:
            g, layout = self.geometry_at(block), self.layout_at(block)
            expected = expected_shape(matrix, g, layout)
            if entry.shape != expected:
                config = "the config" if g is self.geometry else "its vision_config"
                return (
                    f"{where} has shape {list(entry.shape)} but {config} implies "
                    f"{list(expected)} ({_shape_reason(matrix, g, layout)})"
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
    vision: bool = False,
) -> Checkpoint:
    """Read the config and the weight headers of the checkpoint at ``path``.

    ``path`` is a directory or a single weight file in any layout of
    :mod:`pytest_spectral.checkpoints.formats`; ``config_path`` (``--spectral-config``) wins over
    the config the checkpoint carries. ``family`` describes an architecture the plugin does not
    know. ``vision`` (``--spectral-vision``) adds a multimodal wrapper's vision tower as the
    ``vision`` stack. Raises :class:`CheckpointError` naming the file, key or tensor.
    """
    options = options or ReadOptions(config=config_path)
    weights = open_format(path, options)
    if options.config is not None:
        config_file, config = options.config, read_config(options.config)
    else:
        config, config_file = weights.config()
    tower = interpret_vision_config(config, config_file) if vision else None
    model_type = config.get("model_type")  # any JSON value: hashable or not
    wrapper = model_type if isinstance(model_type, str) and model_type in WRAPPERS else None
    tower_family = tower[0] if tower else _tower_family(config, config_file) if wrapper else None
    config, family, variant, geometry, notes, stacks = interpret_config(config, config_file, family)
    layout = Layout(family.name, variant.fused, family.conv1d)
    towers = () if tower_family is None else (tower_family,)
    weights.text_prefix = lambda names: _decoder_prefix(names, family, partial=True)
    entries = weights.tensors(_needed_names(family, *towers), geometry.head_dim)
    unread_tower: tuple[str, ...] = ()
    if tower is None and tower_family is not None and _has_layers(entries, tower_family):
        unread_tower = tuple(dict.fromkeys((*MATRICES, *tower_family.mlp)))
    if stacks:
        if weights.partial:
            raise CheckpointError(
                f"{weights.root}: an update (LoRA adapter) of an encoder-decoder model cannot be "
                "analysed as such; analyse the merged weights (--spectral-adapter=merged)"
            )
        tensors = _stack_tensors(entries, family, geometry, stacks)
        attention, layers, experts = MATRICES, None, {}
    else:
        tensors, attention, layers, experts = _one_stack_tensors(
            entries, family, geometry, config, config_file, notes, partial=weights.partial
        )
    if tower is not None:
        if weights.partial:
            raise CheckpointError(
                f"{weights.root}: --spectral-vision: an update (LoRA adapter) is analysed for "
                "its text model only; run without --spectral-vision"
            )
        span, found = _tower_tensors(entries, *tower, start=geometry.layers)
        stacks += (span,)
        tensors.update(found)
    kinds = {matrix for _, matrix in tensors}
    names = tuple(m for m in MLP_MATRICES if m in kinds)
    return Checkpoint(
        weights.root, config, str(config.get("model_type")), geometry, layout, tensors, names,
        attention, layers, notes, stacks, experts, wrapper, unread_tower,
    )  # fmt: skip


def _tower_family(config: Mapping[str, object], config_file: Path) -> Family | None:
    """The family of a wrapper's vision tower, for a run without ``--spectral-vision`` (which
    only says whether the tower's tensors are there); None when its vision_config cannot be
    read (``--spectral-vision`` says why)."""
    try:
        return interpret_vision_config(config, config_file)[0]
    except CheckpointError:
        return None


def _has_layers(entries: TensorMap, family: Family) -> bool:
    """Whether ``entries`` hold some layer of ``family`` (a vision tower's)."""
    try:
        _decoder_prefix(entries, family, prefer=VISION_WORDS)
    except CheckpointError:
        return False
    return True


def _one_stack_tensors(
    entries: TensorMap,
    family: Family,
    geometry: Geometry,
    config: Mapping[str, object],
    config_file: Path,
    notes: tuple[str, ...],
    *,
    partial: bool,
) -> tuple[
    dict[tuple[int, str], TensorSource],
    tuple[str, ...],
    tuple[int, ...] | None,
    dict[tuple[int, str], ExpertTensors],
]:
    """A model of one stack of layers: its attention and MLP tensors (a sparse layer's routed
    experts apart), the attention matrices it has and, for an update, the layers it has."""
    try:
        prefix = _decoder_prefix(entries, family, partial=partial)
        if partial:
            tensors, attention, layers = _partial_attention(entries, prefix, family, geometry)
        else:
            attention = MATRICES + tuple(m for m in LATENT_MATRICES if m in family.tensors)
            tensors = _attention_tensors(entries, prefix, family, geometry, attention)
            layers = None
    except CheckpointError as exc:  # an undeclared type is refused as such, not for a tensor
        raise (_unsupported(config_file, config.get("model_type")) if notes else exc) from None
    moe = family.moe.get(str(config.get("model_type")))
    experts: dict[tuple[int, str], ExpertTensors] = {}
    if moe is None or partial:
        mlp = _mlp_tensors(entries, prefix, family, geometry)
    else:
        try:
            sparse = moe.schedule(config, geometry.layers)
        except ArchitectureError as exc:
            raise CheckpointError(f"{config_file}: {exc}") from None
        try:
            mlp, experts = _moe_tensors(entries, prefix, moe, geometry.layers, sparse, config)
            _check_expert_count(config_file, experts)
            _check_config_count(config, experts)
        except ArchitectureError as exc:
            raise CheckpointError(f"{config_file}: {exc}") from None
    tensors.update(mlp)
    tensors.update({key: e.sources[0] for key, e in experts.items()})  # names, dtype, file
    return tensors, attention, layers, experts


def _stack_tensors(
    entries: TensorMap, family: Family, geometry: Geometry, stacks: tuple[StackSpan, ...]
) -> dict[tuple[int, str], TensorSource]:
    """The attention and MLP tensors of every stack, keyed by block (its layers numbered on
    after the previous stack's)."""
    tensors: dict[tuple[int, str], TensorSource] = {}
    for (_, stack), span in zip(family.stack_families(), stacks, strict=True):
        shape = replace(geometry, layers=span.layers)
        prefix = _decoder_prefix(entries, stack)
        found = _attention_tensors(entries, prefix, stack, shape)
        found.update(_mlp_tensors(entries, prefix, stack, shape))
        tensors.update({(span.start + layer, m): entry for (layer, m), entry in found.items()})
    return tensors


def interpret_config(
    config: Mapping[str, object], config_file: Path, family: Family | None = None
) -> tuple[dict[str, object], Family, Variant, Geometry, tuple[str, ...], tuple[StackSpan, ...]]:
    """What ``config`` (from ``config_file``) means, as transformers reads it: the analysed
    model's config with class defaults and aliases applied, its family (``family`` when the
    user described one), layout variant and geometry, the notes a run prints about it, and an
    encoder-decoder model's stacks (none for a model of one stack).

    Raises :class:`CheckpointError` naming ``config_file`` and the key.
    """
    try:
        config, known = text_model(config)
    except ArchitectureError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    model_type = str(config.get("model_type"))
    notes: tuple[str, ...] = ()
    if model_type in NO_ATTENTION:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} has no attention (a state-space or "
            "recurrent model): there are no attention heads to analyse"
        )
    if family is None:
        family = known or GENERIC
        if known is None:
            notes = (_generic_note(config_file, config.get("model_type")),)
    try:
        variant = family.layout_of(config)
        if variant.tensors is not None:  # this config's tensor names (no q_a without q_lora)
            family = replace(family, tensors=variant.tensors)
        geometry, stacks = _stacked_geometry(config_file, config, family, variant)
    except ArchitectureError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    except CheckpointError as exc:
        if not notes:
            raise
        why = str(exc).removeprefix(f"{config_file}: ")
        raise _unsupported(config_file, config.get("model_type"), why) from None
    if variant.fused == "interleaved" and geometry.kv_heads != geometry.heads:
        raise CheckpointError(
            f"{config_file}: the interleaved fused layout holds q, k and v of every head in "
            f"turn, so it needs as many key/value heads as query heads; the config gives "
            f"{geometry.kv_heads} key/value heads for {geometry.heads} query heads (for "
            "grouped-query attention, fused = 'grouped' or 'concat' may be the layout)"
        )
    return config, family, variant, geometry, notes, stacks


def interpret_vision_config(
    config: Mapping[str, object], config_file: Path
) -> tuple[Family, Geometry, Layout, str]:
    """The family, geometry and layout of a multimodal wrapper's vision tower, read from its
    ``vision_config`` as transformers reads it, and the tower's model_type (CLIP's and
    SigLIP's towers share the family of CLIP's text model). Raises :class:`CheckpointError`
    naming the file and the key."""
    try:
        vision, family = vision_model(config)
        variant = family.layout_of(vision)
    except ArchitectureError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    geometry = _geometry(f"{config_file} (vision_config)", vision, family, variant)
    layout = Layout(family.name, variant.fused, family.conv1d)
    return family, geometry, layout, str(vision["model_type"])


def _tower_tensors(
    entries: TensorMap,
    family: Family,
    geometry: Geometry,
    layout: Layout,
    tower_type: str,
    *,
    start: int,
) -> tuple[StackSpan, dict[tuple[int, str], TensorSource]]:
    """The vision stack (blocks from ``start`` on, after the text model's) and its layers'
    attention and MLP tensors, keyed by block. Raises :class:`CheckpointError` naming the
    tensor the tower lacks."""
    try:
        prefix = _decoder_prefix(
            entries, family, prefer=VISION_WORDS, announced=f"{tower_type} layout its vision_config"
        )
        found = _attention_tensors(entries, prefix, family, geometry)
        found.update(_mlp_tensors(entries, prefix, family, geometry))
    except CheckpointError as exc:
        raise CheckpointError(f"--spectral-vision: the vision tower: {exc}") from None
    span = StackSpan(VISION, start, geometry.layers, geometry, layout)
    return span, {(start + layer, m): entry for (layer, m), entry in found.items()}


def _stacked_geometry(
    path: Path, config: Mapping[str, object], family: Family, variant: Variant
) -> tuple[Geometry, tuple[StackSpan, ...]]:
    """The geometry of all blocks, and the stacks of an encoder-decoder model.

    Every stack must have the same heads (count, size and width): one geometry describes
    the slices of all blocks. Real checkpoints do (BART, Whisper and T5 name the counts
    apart, but give them equal values); others are refused, naming both counts.
    """
    if not family.stacks:
        return _geometry(path, config, family, variant), ()
    spans: list[StackSpan] = []
    first: tuple[str, Geometry] | None = None
    for name, stack in family.stack_families():
        g = _geometry(path, config, stack, variant)
        if first is not None and replace(g, layers=0) != replace(first[1], layers=0):
            raise CheckpointError(
                f"{path}: the {name} stack has {g.heads} heads of size {g.head_dim} "
                f"({stack.heads_keys[0]!r}), the {first[0]} stack {first[1].heads} of size "
                f"{first[1].head_dim}: stacks with different heads cannot be analysed by this "
                "version"
            )
        first = first or (str(name), g)
        spans.append(StackSpan(str(name), sum(s.layers for s in spans), g.layers))
    assert first is not None
    return replace(first[1], layers=sum(s.layers for s in spans)), tuple(spans)


def _model_type_phrase(model_type: object) -> str:
    """A config's model_type as messages name it; a config may have none."""
    if model_type is None:
        return "a config without 'model_type'"
    return f"model_type {printable_type(model_type)}"


def _generic_note(config_file: Path, model_type: object) -> str:
    """The line a run prints when it reads an undeclared model_type with the common layout."""
    return (
        f"spectral: {_model_type_phrase(model_type)} ({config_file}) is not one the plugin "
        "declares; its tensors follow layers.N.self_attn.{q,k,v,o}_proj, analysed as the llama "
        "layout (K/V heads from num_key_value_heads, else one per query head; head_dim from "
        "head_dim, else hidden_size / num_attention_heads)"
    )


def _unsupported(config_file: Path, model_type: object, why: str = "") -> CheckpointError:
    """The refusal of an undeclared model_type; ``why`` says what the common layout's reading
    found wrong, when it got that far."""
    found = f" (read with the common llama layout: {why})" if why else ""
    return CheckpointError(
        f"{config_file}: {_model_type_phrase(model_type)} is not supported{found}; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}. Describe its layout with "
        "--spectral-architecture FILE.toml (see the README)"
    )


def _geometry(
    path: Path | str, config: Mapping[str, object], family: Family, variant: Variant
) -> Geometry:
    def value(keys: tuple[str, ...], default: object = None) -> tuple[str, object]:
        for key in keys:
            if config.get(key) is not None:
                return key, config[key]
        return (keys[0] if keys else "?"), default

    def positive(keys: tuple[str, ...], default: object = None) -> int:
        key, number = value(keys, default)
        if number is None:
            named = f" (the key {family.declared_in} names)" if family.declared_in else ""
            raise CheckpointError(f"{path}: has no key {key!r}{named}")
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
        given = " and no head_dim is given" if family.head_dim_keys else ""
        raise CheckpointError(
            f"{path}: hidden size {hidden} ({value(family.hidden_keys)[0]!r}) is not divisible "
            f"by {heads} attention heads ({value(family.heads_keys)[0]!r}){given}"
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


def _check_plausible(path: Path | str, g: Geometry, keys: Mapping[str, str]) -> None:
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


def _needed_names(*families: Family) -> Callable[[str], bool]:
    """Whether a tensor name may be one the checkpoint needs: a layer's attention or MLP
    tensor, or its GPTQ/AWQ ``.qweight`` (for the message saying it is quantized).

    Only those entries of a header are kept, so a header of a million junk entries costs its
    parse and nothing more.
    """
    templates = []
    stacks = [stack for family in families for _, stack in family.stack_families()]
    for stack in stacks:
        templates += [stack.layer + name for name in stack.tensors.values()]
        templates += [stack.mlp_prefix + name for name in stack.mlp.values()]
    for moe in (moe for family in families for moe in family.moe.values()):
        names = [*moe.dense.values()]
        for form in moe.forms:
            names += [*form.whole.values(), *(m.name for m in form.experts.values())]
        templates += [moe.prefix + name for name in names]
    # after the layer number, and after the expert number where there is one
    tails = [template.split("{layer}", 1)[1].split("{expert}")[-1] for template in templates]
    tails += [t.removesuffix(".weight") + ".qweight" for t in tails if t.endswith(".weight")]
    tails += [t + ".weight" for t in tails if not t.endswith("weight")]  # for the hint
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
            if entry is None and layer == 0 and family.declared_in is not None:
                raise CheckpointError(_undeclared_tensor(entries, prefix, family, matrix))
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
            if family.declared_in is not None:
                raise CheckpointError(_undeclared_tensor(entries, prefix, family, matrix))
            continue
        for layer in range(geometry.layers):
            name = prefix + family.tensor_name(layer, matrix)
            entry = entries.get(name)
            if entry is None:
                raise CheckpointError(f"tensor {name!r} is missing (layer 0 has its {matrix})")
            found[(layer, matrix)] = entry
    return found


def _moe_tensors(
    entries: TensorMap,
    prefix: str,
    moe: Moe,
    layers: int,
    sparse: tuple[int, ...],
    config: Mapping[str, object],
) -> tuple[dict[tuple[int, str], TensorSource], dict[tuple[int, str], ExpertTensors]]:
    """A mixture of experts' MLP tensors: the dense MLP of its dense layers, and the router,
    shared experts and routed experts of its ``sparse`` layers, in the first storage form the
    first sparse layer has. A matrix the first layer of its kind has must be in every layer of
    that kind; a checkpoint with no MLP tensor at all (attention only) has no MLP items. A
    layer the config makes sparse (or dense) without the tensors of its kind, in a checkpoint
    that has MLP tensors, raises ArchitectureError naming the tensor and the config's keys."""
    dense = [layer for layer in range(layers) if layer not in set(sparse)]
    why = moe.schedule.why(config)
    whole = _present_in_all(entries, prefix, moe.prefix, moe.dense, dense, f"dense by {why}")
    form = _sparse_form(entries, prefix, moe, sparse[0]) if sparse else None
    has_mlp = bool(whole) or any(
        _expert_numbers(entries, prefix, moe.prefix + matrix.name)
        if matrix.per_expert
        else _named_layers_of(entries, prefix, moe.prefix + matrix.name)
        for layout in moe.forms
        for matrix in layout.experts.values()
    )
    if has_mlp and sparse and form is None:
        name = prefix + moe.prefix.format(layer=sparse[0])
        name += next(iter(moe.forms[0].experts.values())).name.format(expert=0)
        raise ArchitectureError(
            f"tensor {name!r} is missing: layer {sparse[0]} is sparse by {why}, and the "
            "checkpoint has MLP tensors elsewhere; the config and the weights disagree about "
            "which layers have experts"
        )
    if has_mlp and dense and moe.dense and not whole:
        name = prefix + moe.prefix.format(layer=dense[0]) + next(iter(moe.dense.values()))
        raise ArchitectureError(
            f"tensor {name!r} is missing: layer {dense[0]} is dense by {why}, and the "
            "checkpoint has MLP tensors elsewhere; the config and the weights disagree about "
            "which layers have experts"
        )
    if form is None:
        return whole, {}
    first = sparse[0]
    whole.update(
        _present_in_all(
            entries, prefix, moe.prefix, form.whole, list(sparse), f"sparse by {why}"
        )
    )
    experts: dict[tuple[int, str], ExpertTensors] = {}
    for kind, matrix in form.experts.items():
        template = moe.prefix + matrix.name
        numbers = _expert_numbers(entries, prefix, template) if matrix.per_expert else {}
        for layer in sparse:
            # per expert: numbers 0 to count - 1, found in the names (a number far beyond the
            # count, from a hostile header, names the first one missing below it)
            found = numbers.get(layer, set()) if matrix.per_expert else {0}
            count = len(found)
            names = [prefix + template.format(layer=layer, expert=e) for e in range(count)]
            if max(found, default=-1) != count - 1 or not found:
                absent = min(set(range(count + 1)) - found)
                name = prefix + template.format(layer=layer, expert=absent)
                raise CheckpointError(
                    f"tensor {name!r} is missing (layer {first} has its expert {kind} matrices)"
                )
            if not matrix.per_expert and names[0] not in entries:
                raise CheckpointError(
                    f"tensor {names[0]!r} is missing (layer {first} has its expert {kind} matrices)"
                )
            experts[(layer, f"expert-{kind}")] = ExpertTensors(
                matrix, tuple(entries[name] for name in names)
            )
    return whole, experts


def _sparse_form(entries: TensorMap, prefix: str, moe: Moe, layer: int) -> SparseLayout | None:
    """The first of ``moe``'s storage forms whose first expert tensor ``layer`` has."""
    for form in moe.forms:
        matrix = next(iter(form.experts.values()))
        if prefix + moe.prefix.format(layer=layer) + matrix.name.format(expert=0) in entries:
            return form
    return None


def _named_layers_of(entries: TensorMap, prefix: str, template: str) -> bool:
    """Whether any tensor is named ``prefix`` + ``template`` (with ``{layer}``) for a layer."""
    before, _, after = (prefix + template.format(layer="\0")).partition("\0")
    pattern = re.compile(re.escape(before) + r"[0-9]{1,18}" + re.escape(after))
    return any(pattern.fullmatch(name) for name in entries)


def _check_config_count(
    config: Mapping[str, object], experts: Mapping[tuple[int, str], ExpertTensors]
) -> None:
    """Refuse routed experts whose number per layer is not the one the config gives. Of
    several count keys (transformers' aliases, one a class default) one must match."""
    for (layer, kind), stored in experts.items():
        counts = expert_counts(config, layer)
        if counts and all(count != stored.count for _, count in counts):
            key, count = counts[0]
            raise ArchitectureError(
                f"{key!r} is {count}, but layer {layer} stores {stored.count} experts' "
                f"{kind.removeprefix('expert-')} matrices ({stored.sources[0].name!r}...); "
                "the config and the weights disagree"
            )


def _present_in_all(
    entries: TensorMap,
    prefix: str,
    template: str,
    names: Mapping[str, str],
    layers: list[int],
    why: str,
) -> dict[tuple[int, str], TensorSource]:
    """The matrices of ``names`` (under ``prefix`` and ``template``, with ``{layer}``) the
    first of ``layers`` has, in each of ``layers``; ``why`` says what makes them one kind
    (``dense by the config's ...``), for the message naming a missing one."""
    found: dict[tuple[int, str], TensorSource] = {}
    for matrix, name in names.items():
        if not layers or prefix + template.format(layer=layers[0]) + name not in entries:
            continue
        for layer in layers:
            full = prefix + template.format(layer=layer) + name
            if full not in entries:
                raise CheckpointError(
                    f"tensor {full!r} is missing (layer {layers[0]} has its {matrix}, and "
                    f"layer {layer} is {why})"
                )
            found[(layer, matrix)] = entries[full]
    return found


def _expert_numbers(entries: TensorMap, prefix: str, template: str) -> dict[int, set[int]]:
    """Layer -> the expert numbers of the tensors named ``prefix`` + ``template`` (with
    ``{layer}`` and ``{expert}``), read from the names in one pass (a layer's experts may be
    hundreds: trying names one by one would not know where to stop)."""
    number = "(0|[1-9][0-9]{0,17})"
    pieces = re.split("([\x00\x01])", template.format(layer="\x00", expert="\x01"))
    marked = "".join(number if p in ("\x00", "\x01") else re.escape(p) for p in pieces)
    pattern = re.compile(re.escape(prefix) + marked)
    numbers: dict[int, set[int]] = {}
    for name in entries:
        match = pattern.fullmatch(name)
        if match is not None:
            numbers.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return numbers


def _check_expert_count(path: Path, experts: Mapping[tuple[int, str], ExpertTensors]) -> None:
    """Refuse expert tensors that would make a flood of tiny items (see the constants)."""
    items = sum(e.count for e in experts.values())
    tiny = [e for e in experts.values() if len(e.sources[0].shape) >= 2]
    smallest = min((e.shape[0] * e.shape[1] for e in tiny), default=MIN_WEIGHTS_PER_ITEM)
    if items > SMALL_MODEL_ITEMS and smallest < MIN_WEIGHTS_PER_ITEM:
        raise CheckpointError(
            f"{path}: the expert tensors make {items} expert items, some of only {smallest} "
            f"weights; beyond {SMALL_MODEL_ITEMS} items each must stand for at least "
            f"{MIN_WEIGHTS_PER_ITEM} weights: implausible expert tensors, refused"
        )


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


def _decoder_prefix(
    entries: TensorMap,
    family: Family,
    *,
    partial: bool = False,
    prefer: tuple[str, ...] = ("language_model",),
    announced: str | None = None,
) -> str:
    """The name prefix of the text decoder's layers (``model.``, ``transformer.``, none...).

    Multimodal checkpoints also hold a vision tower; a prefix naming the language model wins
    (for the tower's layers: one naming the tower, ``prefer``), then the shortest. The first
    layer's Q weight shows it; for a ``partial`` update (which may lack both), any attention
    weight of any layer. ``announced``: what the config announces, for the message when no
    layer is found (the family's layout, its config.json).
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
        if family.declared_in is not None:
            raise CheckpointError(_undeclared_tensor(entries, "", family, "q"))
        raise CheckpointError(
            f"no tensor named like '...{family.tensor_name(0, 'q')}': this checkpoint does not "
            f"have the {announced or f'{family.name} layout its config.json'} announces"
        )
    return min(prefixes, key=lambda p: (not any(w in p for w in prefer), len(p), p))


def _undeclared_tensor(entries: TensorMap, prefix: str, family: Family, matrix: str) -> str:
    """Why the layer-0 tensor of ``matrix`` that an architecture file names is not in the
    checkpoint: the file and its key, and the name with ``.weight`` when that one exists
    (tensor names are taken literally, and a module's weight ends in ``.weight``)."""
    mlp = matrix in family.mlp
    key = matrix if mlp else tensor_key(family.fused, matrix)
    name = family.tensor_name(0, matrix)
    given = family.mlp[key] if mlp else family.tensors[key]
    why = (
        f"{family.declared_in}: [architecture] keys {'mlp_layer' if mlp else 'layer'!r} and "
        f"{key!r} name tensor '...{name}' (layer 0), which the checkpoint does not have"
    )
    if any(e.endswith(f"{prefix}{name}.weight") for e in entries):
        why += f"; it has '...{name}.weight': write {key} = \"{given}.weight\""
    return why


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
