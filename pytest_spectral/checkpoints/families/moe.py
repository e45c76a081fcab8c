"""Mixtures of experts: where a model type keeps its experts, shared experts and router, and
which of its layers are sparse.

Two storage forms meet a user. Checkpoints published before transformers 5, and the ones
transformers 5 itself saves for most families (it converts back on ``save_pretrained``), hold
one 2-D ``nn.Linear`` weight (out x in) per expert: ``mlp.experts.N.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.N.w1.weight``. Others hold one 3-D tensor per layer and
kind (:func:`stacked`): gpt-oss and Llama 4 as ``[experts, in, out]`` with gate and up fused
(gpt-oss alternating them along the output axis, Llama 4 as halves), GraniteMoE as
``[experts, out, in]`` halves, and transformers 5's own parameters
(``mlp.experts.gate_up_proj`` ``[experts, 2 x intermediate, hidden]``, gate then up;
``down_proj`` ``[experts, hidden, intermediate]``), which a training framework saving the
model's ``state_dict`` writes as they are. Every form gives the same items: per layer and
expert, its ``gate``, ``up`` and ``down`` matrices in ``nn.Linear`` orientation.

Which layers are sparse is the config's (:data:`Schedule`), read as the modeling code reads
it; the others have the model type's dense MLP.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pytest_spectral.checkpoints.families.family import ArchitectureError, MatrixNames

#: the kinds of an expert's matrices; items are ``expertNN-gate``..., rules name the kind
#: ``expert-gate``...
EXPERT_PARTS: tuple[str, ...] = ("gate", "up", "down")
EXPERT_MATRICES: tuple[str, ...] = tuple(f"expert-{part}" for part in EXPERT_PARTS)
#: whole matrices of a sparse layer besides the routed experts (one each per layer)
SHARED_MATRICES: tuple[str, ...] = ("shared-gate", "shared-up", "shared-gate_up", "shared-down")
ROUTER = "router"
_EXPERT_ITEM = re.compile(r"^expert(\d+)-(gate|up|down)$")


def expert_item(expert: int, kind: str, width: int) -> str:
    """The item name of ``expert``'s matrix of ``kind`` (``expert-gate``): ``expert05-gate``,
    the number zero-padded to ``width`` digits."""
    return f"expert{expert:0{width}d}-{kind.removeprefix('expert-')}"


def split_expert_item(matrix: str) -> tuple[str, int | None]:
    """``(kind, expert)`` of an item's matrix name: ``("expert-gate", 5)`` for
    ``expert05-gate``, ``(matrix, None)`` for any other name."""
    match = _EXPERT_ITEM.match(matrix)
    if match is None:
        return matrix, None
    return f"expert-{match.group(2)}", int(match.group(1))


def matrix_kind(matrix: str) -> str:
    """What rules and ``--spectral-matrices`` call an item's matrix: ``expert-gate`` for every
    expert's gate matrix, the name itself for any other."""
    return split_expert_item(matrix)[0]


@dataclass(frozen=True)
class ExpertMatrix:
    """Where one kind of expert matrix (gate, up or down) of a sparse layer is stored."""

    #: tensor name under :attr:`Moe.prefix`; with ``{expert}``: one 2-D ``nn.Linear`` weight
    #: per expert (out x in); without: one 3-D tensor holding every expert on axis 0
    name: str
    #: a 3-D tensor stored ``[experts, in, out]`` (gpt-oss, Llama 4) instead of out x in
    transposed: bool = False
    #: in a fused gate/up tensor, this kind's part along the output axis (0: gate, 1: up)
    part: int | None = None
    #: the two parts alternate along the output axis (gpt-oss) instead of being halves
    interleaved: bool = False

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.name


#: kind (gate, up, down) -> where it is stored
ExpertStore = Mapping[str, ExpertMatrix]


def per_expert(gate: str, up: str, down: str, experts: str = "mlp.experts") -> ExpertStore:
    """One 2-D weight per expert: ``<experts>.N.<gate>`` and so on."""
    names = {"gate": gate, "up": up, "down": down}
    return {kind: ExpertMatrix(f"{experts}.{{expert}}.{name}") for kind, name in names.items()}


def stacked(
    gate_up: str, down: str, *, transposed: bool = False, interleaved: bool = False
) -> ExpertStore:
    """Two 3-D tensors: gate and up fused along the output axis (gate first), and down."""
    return {
        "gate": ExpertMatrix(gate_up, transposed, part=0, interleaved=interleaved),
        "up": ExpertMatrix(gate_up, transposed, part=1, interleaved=interleaved),
        "down": ExpertMatrix(down, transposed),
    }


@dataclass(frozen=True)
class SparseLayout:
    """One form a sparse layer may be stored in: its routed experts, and its other whole
    matrices (router, shared experts: plugin name -> tensor), all under :attr:`Moe.prefix`."""

    experts: ExpertStore
    whole: MatrixNames = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule:
    """Which layers are sparse, as the modeling code decides it from the config."""

    #: (resolved config, layer count) -> the sparse layers, ascending; raises ArchitectureError
    decide: Callable[[Mapping[str, object], int], tuple[int, ...]]
    #: the config keys the decision reads (none: every layer is sparse), named when the
    #: weights disagree with it
    keys: tuple[str, ...] = ()

    def __call__(self, config: Mapping[str, object], layers: int) -> tuple[int, ...]:
        return self.decide(config, layers)

    def why(self, config: Mapping[str, object]) -> str:
        """What decides it, in words: ``the config's decoder_sparse_step=1, ...``."""
        if not self.keys:
            return "every layer of this model type is sparse"
        return "the config's " + ", ".join(f"{key}={config.get(key)!r}" for key in self.keys)


every_layer = Schedule(lambda config, layers: tuple(range(layers)))
"""Every layer is sparse (Mixtral, gpt-oss, OLMoE...)."""


def after_first_dense(key: str = "first_k_dense_replace") -> Schedule:
    """Layers from ``config[key]`` on (GLM-4-MoE, dots1, DeepSeek-V3: ``layer_idx >=
    config.first_k_dense_replace``)."""

    def decide(config: Mapping[str, object], layers: int) -> tuple[int, ...]:
        return tuple(range(min(_integer(config, key, low=0), layers), layers))

    return Schedule(decide, (key,))


def _sparse_step(config: Mapping[str, object], layers: int) -> tuple[int, ...]:
    step = _integer(config, "decoder_sparse_step", low=1)
    dense = _layer_list(config, "mlp_only_layers")
    # Qwen3-MoE stores num_experts as num_local_experts (its attribute_map): name the key the
    # config holds when its value is refused
    stored = next((key for key in EXPERT_COUNT_KEYS if config.get(key) is not None), "num_experts")
    if _integer(config, stored, low=0) == 0:
        return ()
    return tuple(layer for layer in range(layers) if layer not in dense and (layer + 1) % step == 0)


sparse_step = Schedule(_sparse_step, ("decoder_sparse_step", "mlp_only_layers", "num_experts"))
"""Qwen2-MoE and Qwen3-MoE: a layer not in ``mlp_only_layers`` whose number plus one is a
multiple of ``decoder_sparse_step``, when ``num_experts > 0``."""


def _interval(config: Mapping[str, object], layers: int) -> tuple[int, ...]:
    every = _integer(config, "moe_layer_interval", low=1)
    start = _integer(config, "moe_layer_start_index")
    end = _integer(config, "moe_layer_end_index")
    end = layers - 1 if end == -1 else end
    return tuple(
        layer for layer in range(layers) if (layer + 1) % every == 0 and start <= layer <= end
    )


interval = Schedule(
    _interval, ("moe_layer_interval", "moe_layer_start_index", "moe_layer_end_index")
)
"""ERNIE 4.5 MoE: every ``moe_layer_interval``-th layer (counted from one) from
``moe_layer_start_index`` to ``moe_layer_end_index`` inclusive (``-1``: the last)."""


def _listed_or_interleaved(config: Mapping[str, object], layers: int) -> tuple[int, ...]:
    if config.get("moe_layers") is not None:
        listed = _layer_list(config, "moe_layers")
        return tuple(layer for layer in range(layers) if layer in listed)
    step = _integer(config, "interleave_moe_layer_step", low=1)
    return tuple(range(step - 1, layers, step))


listed_or_interleaved = Schedule(
    _listed_or_interleaved, ("moe_layers", "interleave_moe_layer_step")
)
"""Llama 4: ``moe_layers`` when given, else every ``interleave_moe_layer_step``-th layer
(``range(step - 1, layers, step)``)."""

#: the config keys that name the routed experts per sparse layer, as transformers' config
#: classes store it (their ``attribute_map`` aliases resolved)
EXPERT_COUNT_KEYS: tuple[str, ...] = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
)


def expert_counts(config: Mapping[str, object], layer: int) -> list[tuple[str, int]]:
    """``(key, count)`` for each of :data:`EXPERT_COUNT_KEYS` ``config`` has: the routed
    experts it gives sparse ``layer`` (an integer, or HunYuan's list of one per layer).
    Raises ArchitectureError for a value of the wrong type or range."""
    counts = []
    for key in EXPERT_COUNT_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                raise ArchitectureError(f"{key!r} must be an integer >= 0, got {value!r}")
            if layer >= len(value):
                raise ArchitectureError(f"{key!r} names no count for layer {layer}: {value!r}")
            counts.append((key, value[layer]))
        else:
            counts.append((key, _integer(config, key, low=0)))
    return counts


@dataclass(frozen=True)
class Moe:
    """How one model type lays out its sparse (and dense) MLP layers."""

    #: the forms a sparse layer may be stored in, tried in order: the first whose first
    #: expert tensor the first sparse layer has is the checkpoint's
    forms: tuple[SparseLayout, ...]
    #: a dense layer's MLP matrices (plugin name -> tensor)
    dense: MatrixNames = field(default_factory=dict)
    #: which layers are sparse, as the modeling code decides it from the config
    schedule: Schedule = field(default=every_layer, compare=False)
    #: every tensor name is under this prefix (with ``{layer}``), after any model-level prefix
    prefix: str = "layers.{layer}."


def _integer(config: Mapping[str, object], key: str, low: int | None = None) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ArchitectureError(f"{key!r} must be an integer{bound}, got {value!r}")
    return value


def _layer_list(config: Mapping[str, object], key: str) -> frozenset[int]:
    value = config.get(key)
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ArchitectureError(f"{key!r} must be a list of layer numbers, got {value!r}")
    return frozenset(value)
