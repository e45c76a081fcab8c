"""Where each family keeps its attention heads: one small declarative description per family.

A head's Q, K or V slice is a block of ``head_dim`` rows of the projection in ``nn.Linear``
orientation (``out x in``); its O slice is a block of ``head_dim`` columns of the output
projection. Families differ only in names, in how Q, K and V are fused into one tensor, and in
whether weights are stored transposed (GPT-2's ``Conv1D``). Those three facts, per family, are
all the code needs; ``spectra.head_blocks`` turns them into views.

Fused layouts (rows of the fused ``out x in`` weight, in units of ``head_dim``):

* ``concat``: all Q heads, then all K heads, then all V heads (Phi-3, GPT-2, Falcon-7B);
* ``interleaved``: per head, its q, k and v rows in turn (GPT-NeoX/Pythia, Falcon-RW);
* ``grouped``: per K/V head, the query heads that share it, then its k, then its v (Falcon-40B).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

FUSED_LAYOUTS = ("concat", "interleaved", "grouped")
MatrixNames = Mapping[str, str]


@dataclass(frozen=True)
class Family:
    """How one family of models names and lays out its attention weights."""

    name: str
    model_types: tuple[str, ...]
    #: a layer's attention tensors share this prefix (after any model-level prefix)
    layer: str
    #: tensor names under ``layer``: keys q, k, v, o, or qkv (fused) and o
    tensors: MatrixNames
    #: MLP tensors for whole-matrix items: prefix (with {layer}) and matrix name -> tensor
    mlp_prefix: str = ""
    mlp: MatrixNames = field(default_factory=dict)
    fused: str | None = None
    conv1d: bool = False
    #: config keys, first present wins
    layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    heads_keys: tuple[str, ...] = ("num_attention_heads",)
    hidden_keys: tuple[str, ...] = ("hidden_size",)
    kv_heads_keys: tuple[str, ...] = ("num_key_value_heads",)
    head_dim_keys: tuple[str, ...] = ("head_dim",)
    #: for families whose fused layout and K/V head count depend on the config
    variant: Callable[[Mapping[str, object]], Variant] | None = field(default=None, compare=False)

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


def _falcon_variant(config: Mapping[str, object]) -> Variant:
    """Falcon's three layouts, exactly as transformers' FalconAttention splits them.

    ``FalconConfig`` defaults ``num_kv_heads`` to ``num_attention_heads``; the attention uses
    it only with ``new_decoder_architecture`` (grouped) and one K/V head with ``multi_query``.
    """
    if _flag(config, "new_decoder_architecture", False):
        return Variant("grouped", ("num_kv_heads",))
    if _flag(config, "multi_query", True):
        return Variant("concat", kv_heads=1)
    return Variant("interleaved")  # one K/V head per query head


def _flag(config: Mapping[str, object], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ArchitectureError(f"{key!r} must be true or false, got {value!r}")
    return value


_LLAMA_NAMES = {m: f"{m}_proj.weight" for m in "qkvo"}
_FC_H_TO_4H = {"fc1": "dense_h_to_4h.weight", "fc2": "dense_4h_to_h.weight"}
#: names of whole-matrix MLP items, across families
MLP_MATRICES: tuple[str, ...] = ("gate", "up", "gate_up", "down", "fc1", "fc2")

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2"),
        layer="layers.{layer}.self_attn.",
        tensors=_LLAMA_NAMES,
        mlp_prefix="layers.{layer}.mlp.",
        mlp={m: f"{m}_proj.weight" for m in ("gate", "up", "down")},
    ),
    Family(
        "phi3",
        ("phi3",),
        layer="layers.{layer}.self_attn.",
        tensors={"qkv": "qkv_proj.weight", "o": "o_proj.weight"},
        mlp_prefix="layers.{layer}.mlp.",
        mlp={"gate_up": "gate_up_proj.weight", "down": "down_proj.weight"},
        fused="concat",
    ),
    Family(
        "gpt2",
        ("gpt2",),
        layer="h.{layer}.attn.",
        tensors={"qkv": "c_attn.weight", "o": "c_proj.weight"},
        mlp_prefix="h.{layer}.mlp.",
        mlp={"fc1": "c_fc.weight", "fc2": "c_proj.weight"},
        fused="concat",
        conv1d=True,
        layers_keys=("n_layer",),
        heads_keys=("n_head",),
        hidden_keys=("n_embd",),
        kv_heads_keys=(),
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        layer="layers.{layer}.attention.",
        tensors={"qkv": "query_key_value.weight", "o": "dense.weight"},
        mlp_prefix="layers.{layer}.mlp.",
        mlp=_FC_H_TO_4H,
        fused="interleaved",
        kv_heads_keys=(),
    ),
    Family(
        "falcon",
        ("falcon",),
        layer="h.{layer}.self_attention.",
        tensors={"qkv": "query_key_value.weight", "o": "dense.weight"},
        mlp_prefix="h.{layer}.mlp.",
        mlp=_FC_H_TO_4H,
        fused="concat",
        kv_heads_keys=(),
        variant=_falcon_variant,
    ),
    Family(
        "opt",
        ("opt",),
        layer="decoder.layers.{layer}.self_attn.",
        tensors={**_LLAMA_NAMES, "o": "out_proj.weight"},
        mlp_prefix="decoder.layers.{layer}.",
        mlp={"fc1": "fc1.weight", "fc2": "fc2.weight"},
        kv_heads_keys=(),
    ),
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta"),
        layer="encoder.layer.{layer}.attention.",
        tensors={
            "q": "self.query.weight",
            "k": "self.key.weight",
            "v": "self.value.weight",
            "o": "output.dense.weight",
        },
        mlp_prefix="encoder.layer.{layer}.",
        mlp={"fc1": "intermediate.dense.weight", "fc2": "output.dense.weight"},
        kv_heads_keys=(),
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: object) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


class ArchitectureError(ValueError):
    """An ``[architecture]`` description that cannot be used."""


_TENSOR_KEYS = ("q", "k", "v", "o", "qkv")
#: [architecture] keys naming config.json keys, and the Family field each sets
_CONFIG_KEY_KEYS = {
    "layers_key": "layers_keys",
    "heads_key": "heads_keys",
    "hidden_key": "hidden_keys",
    "kv_heads_key": "kv_heads_keys",
    "head_dim_key": "head_dim_keys",
}
_CUSTOM_KEYS = {"layer", "fused", "conv1d", *_TENSOR_KEYS, *_CONFIG_KEY_KEYS}


def custom_family(table: Mapping[str, object], source: str) -> Family:
    """A family from the ``[architecture]`` table of a TOML file (see the README).

    Every key is checked for its type and value; raises :class:`ArchitectureError` naming
    ``source`` and the key.
    """

    def fail(key: str, message: str) -> ArchitectureError:
        return ArchitectureError(f"{source}: [architecture] key {key!r}: {message}")

    unknown = sorted(set(table) - _CUSTOM_KEYS)
    if unknown:
        raise ArchitectureError(
            f"{source}: unknown [architecture] keys {unknown}; allowed: {sorted(_CUSTOM_KEYS)}"
        )
    layer = table.get("layer")
    if not isinstance(layer, str) or _placeholders(layer) != ["layer"]:
        raise fail(
            "layer",
            "must be a string with the one placeholder '{layer}' (and no other braces), "
            f"e.g. 'blocks.{{layer}}.attn.'; got {layer!r}",
        )
    fused = table.get("fused")
    if fused is not None and (not isinstance(fused, str) or fused not in FUSED_LAYOUTS):
        raise fail("fused", f"must be one of {', '.join(FUSED_LAYOUTS)}, got {fused!r}")
    conv1d = table.get("conv1d", False)
    if not isinstance(conv1d, bool):
        raise fail("conv1d", f"must be true or false (not quoted), got {conv1d!r}")
    needed = ("qkv", "o") if fused else ("q", "k", "v", "o")
    for key in _TENSOR_KEYS:
        value = table.get(key)
        if key not in needed and value is not None:
            layout = "a fused layout ('fused' set)" if fused else "separate q, k, v tensors"
            raise fail(key, f"does not apply to {layout}")
        if key in needed and (not isinstance(value, str) or not value):
            raise fail(key, f"needs a tensor name (a non-empty string), got {value!r}")
    config_keys = {}
    for key, field_name in _CONFIG_KEY_KEYS.items():
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise fail(key, f"must name a config.json key (a non-empty string), got {value!r}")
        config_keys[field_name] = (value,)
    return Family(
        name="custom",
        model_types=(),
        layer=layer,
        tensors={key: table[key] for key in needed},  # type: ignore[misc]
        fused=fused,  # type: ignore[arg-type]
        conv1d=conv1d,
        **config_keys,  # type: ignore[arg-type]
    )


def _placeholders(template: str) -> list[str] | None:
    """The replacement fields of a ``str.format`` template, or ``None`` when a field has a
    conversion or format spec (``{layer!r}``, ``{layer:>9999999}``) or the braces do not
    parse."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return None
    fields = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if spec or conversion:
            return None
        fields.append(name)
    return fields
