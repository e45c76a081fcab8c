"""What one family of models is: where its attention heads live, and how it reads its config.

A head's Q, K or V slice is a block of ``head_dim`` rows of the projection in ``nn.Linear``
orientation (``out x in``); its O slice is a block of ``head_dim`` columns of the output
projection. Families differ only in names, in how Q, K and V are fused into one tensor, and in
whether weights are stored transposed (GPT-2's ``Conv1D``). Those three facts, per family, are
all the code needs; ``spectra.head_blocks`` turns them into views.

Fused layouts (rows of the fused ``out x in`` weight, in units of ``head_dim``):

* ``concat``: all Q heads, then all K heads, then all V heads (Phi-3, GPT-2, Falcon-7B);
* ``interleaved``: per head, its q, k and v rows in turn (GPT-NeoX/Pythia, Falcon-RW, BLOOM);
* ``grouped``: per K/V head, the query heads that share it, then its k, then its v (Falcon-40B);
* ``latent``: multi-head latent attention (DeepSeek-V2/V3, Kimi K2; DeepSeek-V2 paper,
  arXiv:2405.04434, section 2.1), described by :class:`Latent`: Q has a tensor of its own,
  K and V are fused in the up-projection ``kv_b_proj``, per head its ``qk_nope_head_dim`` K
  rows then its ``v_head_dim`` V rows, both acting on the ``kv_lora_rank`` latent.

Each model type also names the defaults and aliases of transformers' config class for it
(:class:`ConfigClass`), so that a ``config.json`` means what it means to transformers without
importing it: transformers writes only the keys a config needs, and a published config may
leave out any key whose class default applies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_spectral.checkpoints.families.moe import Moe

#: the fused layouts an ``[architecture]`` file may name
FUSED_LAYOUTS = ("concat", "interleaved", "grouped")
#: every fused layout, and the matrices it fuses into one tensor (``Family.tensors`` names that
#: tensor by the matrices' letters: ``qkv``, ``kv``)
FUSED_MATRICES: Mapping[str, str] = {**dict.fromkeys(FUSED_LAYOUTS, "qkv"), "latent": "kv"}
MatrixNames = Mapping[str, str]
#: names of a dense MLP's whole-matrix items, across families
DENSE_MLP_MATRICES: tuple[str, ...] = ("gate", "up", "gate_up", "down", "fc1", "fc2")
#: whole-matrix items of multi-head latent attention: the query down-projection ``q_a_proj``,
#: the key/value down-projection (the first ``kv_lora_rank`` rows of ``kv_a_proj_with_mqa``)
#: and the rope key all heads share (its last ``qk_rope_head_dim`` rows)
LATENT_MATRICES: tuple[str, ...] = ("q_a", "kv_a", "k_rope")
#: the config keys geometry is read from, under transformers' standard names
LAYERS, HEADS, HIDDEN, KV_HEADS, HEAD_DIM = (
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "num_key_value_heads",
    "head_dim",
)


class ArchitectureError(ValueError):
    """An ``[architecture]`` description, or a config value a layout depends on, that cannot
    be used."""


@dataclass(frozen=True)
class ConfigClass:
    """What transformers' config class for one ``model_type`` does with a missing key.

    ``defaults`` are the class's ``__init__`` defaults for the keys geometry and layout read
    (an absent ``num_key_value_heads`` or ``head_dim`` not listed here means "as many as query
    heads" and "hidden size / heads", as in the attention modules); ``aliases`` is the class's
    ``attribute_map`` (standard name -> the name stored in ``config.json``, GPT-2's ``n_head``);
    ``nullable`` are the keys whose ``null`` means something else than their default
    (DeepSeek's ``q_lora_rank``: no query latent).
    """

    defaults: Mapping[str, object]
    aliases: Mapping[str, str] = field(default_factory=dict)
    #: keys whose default is another key's value (T5's ``num_decoder_layers``: ``num_layers``)
    same_as: Mapping[str, str] = field(default_factory=dict)
    nullable: frozenset[str] = frozenset()

    def resolve(self, config: Mapping[str, object]) -> dict[str, object]:
        """``config`` with aliases read under their standard names and class defaults filled
        in, as ``AutoConfig`` would see it. A ``null`` counts as absent, except for a
        ``nullable`` key."""
        resolved = {
            key: value
            for key, value in config.items()
            if value is not None or key in self.nullable
        }
        for standard, stored in self.aliases.items():
            if stored in resolved:
                resolved[standard] = resolved[stored]
        for key, value in self.defaults.items():
            resolved.setdefault(key, value)
        for key, source in self.same_as.items():
            if source in resolved:
                resolved.setdefault(key, resolved[source])
        return resolved


def classic(
    layers: int,
    heads: int,
    hidden: int,
    *,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    aliases: Mapping[str, str] | None = None,
    nullable: frozenset[str] = frozenset(),
    **other: object,
) -> ConfigClass:
    """A :class:`ConfigClass` from the defaults most classes have (``None``: derived)."""
    defaults: dict[str, object] = {LAYERS: layers, HEADS: heads, HIDDEN: hidden, **other}
    if kv_heads is not None:
        defaults[KV_HEADS] = kv_heads
    if head_dim is not None:
        defaults[HEAD_DIM] = head_dim
    return ConfigClass(defaults, dict(aliases or {}), nullable=nullable)


#: the stacks of an encoder-decoder model's items, in collection order: the encoder's layers
#: (self-attention, MLP), the decoder's (self-attention, MLP) and the decoder's cross-attention
STACKS: tuple[str, ...] = ("encoder", "decoder", "cross")
#: the stack of a multimodal wrapper's vision tower (``--spectral-vision``), collected after
#: its text model's layers, which keep their names without a stack
VISION = "vision"
#: every stack name an item id, a rule's ``stacks`` or a report's ``stack`` may hold
STACK_NAMES: tuple[str, ...] = (*STACKS, VISION)
#: what a rule's ``stacks`` calls the items in no stack: a multimodal wrapper's text model
#: (beside its ``vision`` stack), and every item of a model of one stack; no item id or
#: report names it (their ``stack`` stays none)
TEXT = "text"
#: every stack name a rule's ``stacks`` may hold, in the order messages list them
RULE_STACK_NAMES: tuple[str, ...] = (*STACKS, TEXT, VISION)


@dataclass(frozen=True)
class Stack:
    """One stack of an encoder-decoder model: where its layers' attention (and MLP) tensors
    are, and the config keys of its layer and head counts (BART's ``encoder_layers``...)."""

    name: str
    layer: str
    tensors: MatrixNames
    layers_keys: tuple[str, ...]
    heads_keys: tuple[str, ...]
    mlp_prefix: str = ""
    mlp: MatrixNames = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """How one family of models names and lays out its attention weights."""

    name: str
    #: model_type -> what its config class does with missing keys
    configs: Mapping[str, ConfigClass]
    #: a layer's attention tensors share this prefix (after any model-level prefix)
    layer: str
    #: tensor names under ``layer``: keys q, k, v, o, or qkv (fused) and o
    tensors: MatrixNames
    #: MLP tensors for whole-matrix items: prefix (with {layer}) and matrix name -> tensor
    mlp_prefix: str = ""
    mlp: MatrixNames = field(default_factory=dict)
    fused: str | None = None
    conv1d: bool = False
    #: its attention weights as the README's table describes them (a test keeps them equal)
    note: str = ""
    #: config keys, first present wins (a custom architecture file may name others)
    layers_keys: tuple[str, ...] = (LAYERS,)
    heads_keys: tuple[str, ...] = (HEADS,)
    hidden_keys: tuple[str, ...] = (HIDDEN,)
    kv_heads_keys: tuple[str, ...] = (KV_HEADS,)
    head_dim_keys: tuple[str, ...] = (HEAD_DIM,)
    #: model_type -> its mixture-of-experts layout (model types without one have the dense
    #: MLP of ``mlp_prefix`` and ``mlp`` in every layer)
    moe: Mapping[str, Moe] = field(default_factory=dict)
    #: for families whose fused layout and K/V head count depend on the config
    variant: Callable[[Mapping[str, object]], Variant] | None = field(default=None, compare=False)
    #: an encoder-decoder model's stacks (``layer``/``tensors`` above: its first's); none for
    #: a model of one stack of layers
    stacks: tuple[Stack, ...] = ()
    #: the architecture file (``--spectral-architecture``) that described this layout; every
    #: tensor it names must exist. ``None`` for a declared family, whose layout the config's
    #: model_type announces and whose MLP names cover variants a checkpoint may lack.
    declared_in: str | None = None

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.configs)

    def stack_families(self) -> tuple[tuple[str | None, Family], ...]:
        """Each stack as a family of its own (one stack of layers), with its name; a model of
        one stack is itself, unnamed."""
        if not self.stacks:
            return ((None, self),)
        return tuple(
            (
                stack.name,
                replace(
                    self,
                    layer=stack.layer,
                    tensors=stack.tensors,
                    mlp_prefix=stack.mlp_prefix,
                    mlp=stack.mlp,
                    layers_keys=stack.layers_keys,
                    heads_keys=stack.heads_keys,
                    stacks=(),
                ),
            )
            for stack in self.stacks
        )

    def layout_of(self, config: Mapping[str, object]) -> Variant:
        """The fused layout and where the K/V head count comes from, for this config.

        Raises :class:`ArchitectureError` naming the config key whose value is unusable.
        """
        if self.variant is not None:
            return self.variant(config)
        return Variant(self.fused, self.kv_heads_keys)

    def tensor_name(self, layer: int, matrix: str) -> str:
        if matrix in self.mlp:
            return self.mlp_prefix.format(layer=layer) + self.mlp[matrix]
        return self.layer.format(layer=layer) + self.tensors[tensor_key(self.fused, matrix)]


def tensor_key(fused: str | None, matrix: str) -> str:
    """The key of ``Family.tensors`` naming the tensor that holds ``matrix``: the fused one
    (``qkv``, ``kv``) where the layout fuses it."""
    together = FUSED_MATRICES.get(fused or "", "")
    return together if matrix in together else matrix


@dataclass(frozen=True)
class Latent:
    """The dimensions of multi-head latent attention, under transformers' config names.

    Query head h is ``qk_nope_head_dim + qk_rope_head_dim`` rows of ``q_b_proj`` (acting on
    the ``q_lora_rank`` query latent) or, with ``q_lora_rank`` null, of ``q_proj`` (acting on
    the hidden state); its K_nope and V are ``qk_nope_head_dim`` and ``v_head_dim`` rows of
    ``kv_b_proj`` (acting on the ``kv_lora_rank`` key/value latent); its O is ``v_head_dim``
    columns of ``o_proj``. As in ``DeepseekV3Attention``, every head has its own K and V.
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Latent:
        """Read from a resolved config (class defaults applied); raises
        :class:`ArchitectureError` naming the key whose value is unusable."""

        def positive(key: str) -> int:
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArchitectureError(f"{key!r} must be a positive integer, got {value!r}")
            return value

        q_lora_rank = None if config.get("q_lora_rank") is None else positive("q_lora_rank")
        return cls(
            q_lora_rank,
            positive("kv_lora_rank"),
            positive("qk_nope_head_dim"),
            positive("qk_rope_head_dim"),
            positive("v_head_dim"),
        )

    def head_rows(self, matrix: str) -> int:
        """Rows of one head's Q, K or V slice (O: its columns)."""
        nope, rope, v = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        return {"q": nope + rope, "k": nope, "v": v, "o": v}[matrix]

    def head_input(self, matrix: str, hidden: int) -> int:
        """What a head's Q, K or V slice multiplies: a latent or the hidden state."""
        if matrix == "q":
            return self.q_lora_rank or hidden
        return self.kv_lora_rank

    def down_rows(self, matrix: str) -> tuple[int, int, int]:
        """``(start, stop, rows)``: the rows of the stored down-projection (``q_a_proj`` or
        ``kv_a_proj_with_mqa``, ``rows`` in all) that a whole-matrix latent item is."""
        kv, rope = self.kv_lora_rank, self.qk_rope_head_dim
        if matrix == "q_a":
            rows = self.q_lora_rank or 0
            return 0, rows, rows
        return {"kv_a": (0, kv, kv + rope), "k_rope": (kv, kv + rope, kv + rope)}[matrix]


@dataclass(frozen=True)
class Variant:
    """A family's layout for one config: how Q/K/V are fused, and how many K/V heads."""

    fused: str | None
    #: config keys holding the K/V head count, first present wins; none present (or no keys):
    #: as many as query heads
    kv_heads_keys: tuple[str, ...] = ()
    #: a count the layout fixes whatever the config says (multi-query attention: 1)
    kv_heads: int | None = None
    #: multi-head latent attention's dimensions (the ``latent`` layout)
    latent: Latent | None = None
    #: the family's tensor names as this config has them, where they differ (``Family.tensors``)
    tensors: MatrixNames | None = None


def flag(config: Mapping[str, object], key: str, default: bool) -> bool:
    """A boolean config value; raises :class:`ArchitectureError` for anything else."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ArchitectureError(f"{key!r} must be true or false, got {value!r}")
    return value
