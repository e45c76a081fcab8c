"""What one family of models is: where its attention heads live, and how it reads its config.

A head's Q, K or V slice is a block of ``head_dim`` rows of the projection in ``nn.Linear``
orientation (``out x in``); its O slice is a block of ``head_dim`` columns of the output
projection. Families differ only in names, in how Q, K and V are fused into one tensor, and in
whether weights are stored transposed (GPT-2's ``Conv1D``). Those three facts, per family, are
all the code needs; ``spectra.head_blocks`` turns them into views.

Fused layouts (rows of the fused ``out x in`` weight, in units of ``head_dim``):

* ``concat``: all Q heads, then all K heads, then all V heads (Phi-3, GPT-2, Falcon-7B);
* ``interleaved``: per head, its q, k and v rows in turn (GPT-NeoX/Pythia, Falcon-RW, BLOOM);
* ``grouped``: per K/V head, the query heads that share it, then its k, then its v (Falcon-40B).

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

FUSED_LAYOUTS = ("concat", "interleaved", "grouped")
MatrixNames = Mapping[str, str]
#: names of a dense MLP's whole-matrix items, across families
DENSE_MLP_MATRICES: tuple[str, ...] = ("gate", "up", "gate_up", "down", "fc1", "fc2")
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
    ``attribute_map`` (standard name -> the name stored in ``config.json``, GPT-2's ``n_head``).
    """

    defaults: Mapping[str, object]
    aliases: Mapping[str, str] = field(default_factory=dict)
    #: keys whose default is another key's value (T5's ``num_decoder_layers``: ``num_layers``)
    same_as: Mapping[str, str] = field(default_factory=dict)

    def resolve(self, config: Mapping[str, object]) -> dict[str, object]:
        """``config`` with aliases read under their standard names and class defaults filled
        in, as ``AutoConfig`` would see it. A ``null`` counts as absent."""
        resolved = {key: value for key, value in config.items() if value is not None}
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
    **other: object,
) -> ConfigClass:
    """A :class:`ConfigClass` from the defaults most classes have (``None``: derived)."""
    defaults: dict[str, object] = {LAYERS: layers, HEADS: heads, HIDDEN: hidden, **other}
    if kv_heads is not None:
        defaults[KV_HEADS] = kv_heads
    if head_dim is not None:
        defaults[HEAD_DIM] = head_dim
    return ConfigClass(defaults, dict(aliases or {}))


#: the stacks of an encoder-decoder model's items, in collection order: the encoder's layers
#: (self-attention, MLP), the decoder's (self-attention, MLP) and the decoder's cross-attention
STACKS: tuple[str, ...] = ("encoder", "decoder", "cross")


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
        key = "qkv" if self.fused and matrix in ("q", "k", "v") else matrix
        return self.layer.format(layer=layer) + self.tensors[key]


@dataclass(frozen=True)
class Variant:
    """A family's layout for one config: how Q/K/V are fused, and how many K/V heads."""

    fused: str | None
    #: config keys holding the K/V head count, first present wins; none present (or no keys):
    #: as many as query heads
    kv_heads_keys: tuple[str, ...] = ()
    #: a count the layout fixes whatever the config says (multi-query attention: 1)
    kv_heads: int | None = None


def flag(config: Mapping[str, object], key: str, default: bool) -> bool:
    """A boolean config value; raises :class:`ArchitectureError` for anything else."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ArchitectureError(f"{key!r} must be true or false, got {value!r}")
    return value
