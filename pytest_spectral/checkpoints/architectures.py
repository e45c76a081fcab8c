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
    variant: Callable[[Mapping[str, object]], tuple[str | None, int | None]] | None = field(
        default=None, compare=False
    )

    def tensor_name(self, layer: int, matrix: str) -> str:
        if matrix in self.mlp:
            return self.mlp_prefix.format(layer=layer) + self.mlp[matrix]
        key = "qkv" if self.fused and matrix in ("q", "k", "v") else matrix
        return self.layer.format(layer=layer) + self.tensors[key]


def _falcon_variant(config: Mapping[str, object]) -> tuple[str | None, int | None]:
    """Falcon's three layouts, exactly as transformers' FalconAttention splits them."""
    if config.get("new_decoder_architecture"):
        return "grouped", int(config.get("num_kv_heads") or 1)  # type: ignore[call-overload]
    if config.get("multi_query", True):
        return "concat", 1
    return "interleaved", None  # one K/V head per query head


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


_CUSTOM_KEYS = {
    "layer",
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "fused",
    "conv1d",
    "layers_key",
    "heads_key",
    "hidden_key",
    "kv_heads_key",
    "head_dim_key",
}


def custom_family(table: Mapping[str, object], source: str) -> Family:
    """A family from the ``[architecture]`` table of a TOML file (see the README)."""
    unknown = sorted(set(table) - _CUSTOM_KEYS)
    if unknown:
        raise ArchitectureError(
            f"{source}: unknown [architecture] keys {unknown}; allowed: {sorted(_CUSTOM_KEYS)}"
        )
    layer = table.get("layer")
    if not isinstance(layer, str) or "{layer}" not in layer:
        raise ArchitectureError(
            f"{source}: [architecture] 'layer' must be a string containing '{{layer}}', "
            "e.g. 'blocks.{layer}.attn.'"
        )
    fused = table.get("fused")
    if fused is not None and fused not in FUSED_LAYOUTS:
        raise ArchitectureError(f"{source}: 'fused' must be one of {FUSED_LAYOUTS}, got {fused!r}")
    needed = ("qkv", "o") if fused else ("q", "k", "v", "o")
    names = {}
    for key in needed:
        value = table.get(key)
        if not isinstance(value, str) or not value:
            raise ArchitectureError(f"{source}: [architecture] needs a tensor name for {key!r}")
        names[key] = value

    def keys(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = table.get(name)
        return (value,) if isinstance(value, str) else default

    return Family(
        name="custom",
        model_types=(),
        layer=layer,
        tensors=names,
        fused=fused,  # type: ignore[arg-type]
        conv1d=bool(table.get("conv1d", False)),
        layers_keys=keys("layers_key", ("num_hidden_layers",)),
        heads_keys=keys("heads_key", ("num_attention_heads",)),
        hidden_keys=keys("hidden_key", ("hidden_size",)),
        kv_heads_keys=keys("kv_heads_key", ("num_key_value_heads",)),
        head_dim_keys=keys("head_dim_key", ("head_dim",)),
    )
