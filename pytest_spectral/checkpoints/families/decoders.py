"""Decoder-only language models: one declarative entry per family.

Defaults are those of transformers' config classes (checked against them for every model type
by ``tests/test_config_semantics.py``); a ``model_type`` shares a family when its checkpoints
name and lay out the attention weights the same way, whatever else differs (norms, rotary
embeddings, biases, mixtures of experts).
"""

from __future__ import annotations

from collections.abc import Mapping

from pytest_spectral.checkpoints.families.family import (
    ConfigClass,
    Family,
    Latent,
    Variant,
    classic,
    flag,
)
from pytest_spectral.checkpoints.families.moe import (
    Moe,
    Schedule,
    SparseLayout,
    after_first_dense,
    every_layer,
    interval,
    listed_or_interleaved,
    per_expert,
    sparse_step,
    stacked,
)

_PROJ = {m: f"{m}_proj.weight" for m in "qkvo"}
_GATED = {m: f"{m}_proj.weight" for m in ("gate", "up", "down")}
_FC_H_TO_4H = {"fc1": "dense_h_to_4h.weight", "fc2": "dense_4h_to_h.weight"}
_GPT2_ALIASES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}


def _gated(module: str) -> dict[str, str]:
    return {m: f"{module}.{m}_proj.weight" for m in ("gate", "up", "down")}


#: experts stored one ``nn.Linear`` per expert, as transformers 5 saves most families
_PER_EXPERT = per_expert("gate_proj.weight", "up_proj.weight", "down_proj.weight")
#: transformers 5's own parameters, as a saved ``state_dict`` holds them
_NATIVE = stacked("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _sparse(
    router: str,
    shared: str | None = None,
    *,
    schedule: Schedule = every_layer,
    dense: str = "mlp",
) -> Moe:
    """A sparse MLP under ``mlp.`` in either storage form (per-expert weights, or transformers
    5's stacked parameters), its router ``mlp.<router>`` and shared experts ``mlp.<shared>``;
    dense layers (``schedule``) have a gated MLP under ``<dense>.``."""
    whole = {"router": f"mlp.{router}"}
    if shared is not None:
        whole.update({f"shared-{m}": n for m, n in _gated(f"mlp.{shared}").items()})
    return Moe(
        (SparseLayout(_PER_EXPERT, whole), SparseLayout(_NATIVE, whole)),
        dense=_gated(dense),
        schedule=schedule,
    )


#: Mixtral and PhiMoE: ``block_sparse_moe.experts.N.w1`` (gate), ``w3`` (up), ``w2`` (down)
_BLOCK_SPARSE = SparseLayout(
    per_expert("w1.weight", "w3.weight", "w2.weight", experts="block_sparse_moe.experts"),
    {"router": "block_sparse_moe.gate.weight"},
)
_GRANITE_MOE = {
    "router": "block_sparse_moe.router.layer.weight",
}
_GRANITE_EXPERTS = stacked(
    "block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"
)
MOE: Mapping[str, Moe] = {
    "mixtral": Moe((_BLOCK_SPARSE, SparseLayout(_NATIVE, {"router": "mlp.gate.weight"}))),
    "phimoe": Moe((_BLOCK_SPARSE, SparseLayout(_NATIVE, {"router": "mlp.router.weight"}))),
    "qwen2_moe": _sparse("gate.weight", "shared_expert", schedule=sparse_step),
    "qwen3_moe": _sparse("gate.weight", schedule=sparse_step),
    "olmoe": _sparse("gate.weight"),
    "hunyuan_v1_moe": _sparse("gate.wg.weight", "shared_mlp"),
    "glm4_moe": _sparse("gate.weight", "shared_experts", schedule=after_first_dense()),
    "dots1": _sparse("gate.weight", "shared_experts", schedule=after_first_dense()),
    "ernie4_5_moe": _sparse("gate.weight", "shared_experts", schedule=interval),
    "gpt_oss": Moe(
        (
            SparseLayout(
                stacked(
                    "mlp.experts.gate_up_proj",
                    "mlp.experts.down_proj",
                    transposed=True,
                    interleaved=True,
                ),
                {"router": "mlp.router.weight"},
            ),
        )
    ),
    "llama4_text": Moe(
        (
            SparseLayout(
                stacked(
                    "feed_forward.experts.gate_up_proj",
                    "feed_forward.experts.down_proj",
                    transposed=True,
                ),
                {
                    "router": "feed_forward.router.weight",
                    **{f"shared-{m}": n for m, n in _gated("feed_forward.shared_expert").items()},
                },
            ),
        ),
        dense=_gated("feed_forward"),
        schedule=listed_or_interleaved,
    ),
    "granitemoe": Moe((SparseLayout(_GRANITE_EXPERTS, _GRANITE_MOE),)),
    "granitemoeshared": Moe(
        (
            SparseLayout(
                _GRANITE_EXPERTS,
                {
                    **_GRANITE_MOE,
                    "shared-gate_up": "shared_mlp.input_linear.weight",
                    "shared-down": "shared_mlp.output_linear.weight",
                },
            ),
        )
    ),
}


def _falcon_variant(config: Mapping[str, object]) -> Variant:
    """Falcon's three layouts, exactly as transformers' FalconAttention splits them.

    ``FalconConfig`` defaults ``num_kv_heads`` to ``num_attention_heads``; the attention uses
    it only with ``new_decoder_architecture`` (grouped) and one K/V head with ``multi_query``.
    """
    if flag(config, "new_decoder_architecture", False):
        return Variant("grouped", ("num_kv_heads",))
    if flag(config, "multi_query", True):
        return Variant("concat", kv_heads=1)
    return Variant("interleaved")  # one K/V head per query head


def _multi_query_variant(config: Mapping[str, object]) -> Variant:
    """GPT-BigCode as its attention splits ``c_attn``: with ``multi_query`` (the default) all
    query heads, then one K and one V head; without, q, k and v per head in turn."""
    if flag(config, "multi_query", True):
        return Variant("concat", kv_heads=1)
    return Variant("interleaved")


#: multi-head latent attention as transformers' DeepseekV2Attention / DeepseekV3Attention
#: names it: Q (q_b_proj), K_nope and V (kv_b_proj), O, and the down-projections
_LATENT = {
    "q": "q_b_proj.weight",
    "kv": "kv_b_proj.weight",
    "o": "o_proj.weight",
    "q_a": "q_a_proj.weight",
    "kv_a": "kv_a_proj_with_mqa.weight",
    "k_rope": "kv_a_proj_with_mqa.weight",
}
#: the multi-head latent attention keys of DeepseekV2Config and DeepseekV3Config
_LATENT_DEFAULTS = {
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
}

#: ``q_lora_rank: null`` (DeepSeek-V2-Lite) means no query latent, not the default rank
_NO_Q_LORA = frozenset({"q_lora_rank"})


def _latent_variant(config: Mapping[str, object]) -> Variant:
    """Multi-head latent attention as DeepseekV3Attention builds it: with ``q_lora_rank``
    null (DeepSeek-V2-Lite) the queries come from ``q_proj`` and there is no ``q_a_proj``;
    every query head has its own K and V (``num_key_value_heads`` is not used for them)."""
    latent = Latent.from_config(config)
    tensors = dict(_LATENT)
    if latent.q_lora_rank is None:
        del tensors["q_a"]
        tensors["q"] = "q_proj.weight"
    return Variant("latent", latent=latent, tensors=tensors)


def _llama_like(name: str, configs: Mapping[str, ConfigClass], **layout: object) -> Family:
    """``layers.N.self_attn.{q,k,v,o}_proj`` and ``layers.N.mlp.{gate,up,down}_proj``."""
    fields: dict[str, object] = {
        "layer": "layers.{layer}.self_attn.",
        "tensors": _PROJ,
        "mlp_prefix": "layers.{layer}.mlp.",
        "mlp": _GATED,
        **layout,
    }
    return Family(name, configs, **fields)  # type: ignore[arg-type]


DECODERS: tuple[Family, ...] = (
    _llama_like(
        "llama",
        {
            "llama": classic(32, 32, 4096),
            "mistral": classic(32, 32, 4096, kv_heads=8),
            "ministral": classic(32, 32, 4096, kv_heads=8),
            "mixtral": classic(32, 32, 4096, kv_heads=8),
            "qwen2": classic(32, 32, 4096, kv_heads=32),
            "qwen2_moe": classic(24, 16, 2048, kv_heads=16, decoder_sparse_step=1, num_experts=60),
            "qwen2_vl_text": classic(80, 64, 8192, kv_heads=8),
            "qwen2_5_vl_text": classic(80, 64, 8192, kv_heads=8),
            "qwen3": classic(32, 32, 4096, kv_heads=32, head_dim=128),
            "qwen3_moe": classic(  # transformers 5 saves num_experts as num_local_experts
                24,
                32,
                2048,
                kv_heads=4,
                decoder_sparse_step=1,
                num_experts=128,
                aliases={"num_experts": "num_local_experts"},
            ),
            "gemma": classic(28, 16, 3072, kv_heads=16, head_dim=256),
            "gemma2": classic(26, 8, 2304, kv_heads=4, head_dim=256),
            "gemma3_text": classic(26, 8, 2304, kv_heads=4, head_dim=256),
            "llama4_text": classic(
                48, 40, 5120, kv_heads=8, head_dim=128, interleave_moe_layer_step=1
            ),
            "gpt_oss": classic(36, 64, 2880, kv_heads=8, head_dim=64),
            "phimoe": classic(32, 32, 4096, kv_heads=8),
            "olmo": classic(32, 32, 4096),
            "olmo2": classic(32, 32, 4096),
            "olmo3": classic(32, 32, 4096),
            "cohere": classic(40, 64, 8192),
            "cohere2": classic(40, 64, 8192),
            "stablelm": classic(32, 32, 2560, kv_heads=32),
            "granite": classic(32, 32, 4096),
            "granitemoe": classic(32, 32, 4096),
            "smollm3": classic(36, 16, 2048, kv_heads=4),
            "exaone4": classic(32, 32, 4096, kv_heads=32),
            "helium": classic(24, 20, 2560, kv_heads=20, head_dim=128),
            "ernie4_5": classic(18, 16, 1024, kv_heads=2, head_dim=128),
            "apertus": classic(32, 32, 4096),
            "seed_oss": classic(64, 80, 4096, kv_heads=8, head_dim=128),
            "hunyuan_v1_dense": classic(32, 32, 4096),
            "nemotron": classic(32, 48, 6144),
            "arcee": classic(32, 32, 2560),
            "olmoe": classic(16, 16, 2048),
            "hunyuan_v1_moe": classic(32, 32, 4096),
            "granitemoeshared": classic(32, 32, 4096),
            "glm4_moe": classic(46, 96, 4096, kv_heads=8, first_k_dense_replace=1),
            "dots1": classic(62, 32, 4608, kv_heads=32, first_k_dense_replace=0),
            "ernie4_5_moe": classic(
                28,
                20,
                2560,
                kv_heads=4,
                moe_layer_start_index=1,
                moe_layer_end_index=-1,
                moe_layer_interval=1,
            ),
        },
        moe=MOE,
        note="`layers.N.self_attn.{q,k,v,o}_proj` (biases and Q/K norms ignored)",
    ),
    _llama_like(
        "latent",
        {
            "deepseek_v2": classic(
                32, 32, 4096, nullable=_NO_Q_LORA, first_k_dense_replace=0, **_LATENT_DEFAULTS
            ),
            "deepseek_v3": classic(
                61, 128, 7168, nullable=_NO_Q_LORA, first_k_dense_replace=3, **_LATENT_DEFAULTS
            ),
            # Kimi K2's own config class (remote code) is DeepSeek's DeepseekV3Config
            "kimi_k2": classic(
                61, 128, 7168, nullable=_NO_Q_LORA, first_k_dense_replace=3, **_LATENT_DEFAULTS
            ),
        },
        tensors=_LATENT,
        # the first first_k_dense_replace layers dense, then routed and shared experts
        moe=dict.fromkeys(
            ("deepseek_v2", "deepseek_v3", "kimi_k2"),
            _sparse("gate.weight", "shared_experts", schedule=after_first_dense()),
        ),
        fused="latent",
        kv_heads_keys=(),
        variant=_latent_variant,
        note="multi-head latent attention: `q_b_proj` (or `q_proj`) and `kv_b_proj` per head, "
        "`o_proj`; `q_a_proj`, `kv_a_proj_with_mqa` whole",
    ),
    _llama_like(
        "starcoder2",
        {"starcoder2": classic(30, 24, 3072, kv_heads=2)},
        mlp={"fc1": "c_fc.weight", "fc2": "c_proj.weight"},
        note="`layers.N.self_attn.{q,k,v,o}_proj`, MLP `c_fc`, `c_proj`",
    ),
    _llama_like(
        "glm",
        {
            "glm": classic(40, 32, 4096, kv_heads=2, head_dim=128),
            "glm4": classic(40, 32, 4096, kv_heads=2, head_dim=128),
        },
        mlp={"gate_up": "gate_up_proj.weight", "down": "down_proj.weight"},
        note="`layers.N.self_attn.{q,k,v,o}_proj`, fused MLP `gate_up_proj`",
    ),
    _llama_like(
        "phi",
        {"phi": classic(24, 32, 2048)},
        tensors={**_PROJ, "o": "dense.weight"},
        mlp={"fc1": "fc1.weight", "fc2": "fc2.weight"},
        note="`layers.N.self_attn.{q,k,v}_proj` and `dense`",
    ),
    _llama_like(
        "phi3",
        {"phi3": classic(32, 32, 3072)},
        tensors={"qkv": "qkv_proj.weight", "o": "o_proj.weight"},
        mlp={"gate_up": "gate_up_proj.weight", "down": "down_proj.weight"},
        fused="concat",
        note="fused `qkv_proj`: all Q heads, then K, then V",
    ),
    Family(
        "gpt2",
        {"gpt2": classic(12, 12, 768, aliases=_GPT2_ALIASES)},
        layer="h.{layer}.attn.",
        tensors={"qkv": "c_attn.weight", "o": "c_proj.weight"},
        mlp_prefix="h.{layer}.mlp.",
        mlp={"fc1": "c_fc.weight", "fc2": "c_proj.weight"},
        fused="concat",
        conv1d=True,
        kv_heads_keys=(),
        note="fused `c_attn` and `c_proj`, stored transposed (`Conv1D`)",
    ),
    Family(
        "gpt_bigcode",
        {"gpt_bigcode": classic(12, 12, 768, aliases=_GPT2_ALIASES, multi_query=True)},
        layer="h.{layer}.attn.",
        tensors={"qkv": "c_attn.weight", "o": "c_proj.weight"},
        mlp_prefix="h.{layer}.mlp.",
        mlp={"fc1": "c_fc.weight", "fc2": "c_proj.weight"},
        fused="concat",
        variant=_multi_query_variant,
        note="fused `c_attn`: all Q heads, then one K and one V head (`multi_query`), else "
        "interleaved per head",
    ),
    Family(
        "gptj",
        {"gptj": classic(28, 16, 4096, aliases=_GPT2_ALIASES)},
        layer="h.{layer}.attn.",
        tensors={**_PROJ, "o": "out_proj.weight"},
        mlp_prefix="h.{layer}.mlp.",
        mlp={"fc1": "fc_in.weight", "fc2": "fc_out.weight"},
        kv_heads_keys=(),
        note="`h.N.attn.{q,k,v,out}_proj`",
    ),
    Family(
        "gpt_neox",
        {"gpt_neox": classic(44, 64, 6144)},
        layer="layers.{layer}.attention.",
        tensors={"qkv": "query_key_value.weight", "o": "dense.weight"},
        mlp_prefix="layers.{layer}.mlp.",
        mlp=_FC_H_TO_4H,
        fused="interleaved",
        kv_heads_keys=(),
        note="fused `query_key_value`, interleaved per head",
    ),
    Family(
        "bloom",
        {
            "bloom": classic(
                2,
                8,
                64,
                aliases={
                    "num_hidden_layers": "n_layer",
                    "num_attention_heads": "n_head",
                    "hidden_size": "n_embed",
                },
            )
        },
        layer="h.{layer}.self_attention.",
        tensors={"qkv": "query_key_value.weight", "o": "dense.weight"},
        mlp_prefix="h.{layer}.mlp.",
        mlp=_FC_H_TO_4H,
        fused="interleaved",
        kv_heads_keys=(),
        note="fused `query_key_value`, interleaved per head",
    ),
    Family(
        "falcon",
        {"falcon": classic(32, 71, 4544, multi_query=True, new_decoder_architecture=False)},
        layer="h.{layer}.self_attention.",
        tensors={"qkv": "query_key_value.weight", "o": "dense.weight"},
        mlp_prefix="h.{layer}.mlp.",
        mlp=_FC_H_TO_4H,
        fused="concat",
        kv_heads_keys=(),
        variant=_falcon_variant,
        note="fused `query_key_value`: multi-query, grouped (`new_decoder_architecture`) or "
        "interleaved",
    ),
    Family(
        "mpt",
        {
            "mpt": classic(
                24,
                16,
                2048,
                aliases={
                    "num_attention_heads": "n_heads",
                    "hidden_size": "d_model",
                    "num_hidden_layers": "n_layers",
                },
            )
        },
        layer="blocks.{layer}.attn.",
        tensors={"qkv": "Wqkv.weight", "o": "out_proj.weight"},
        mlp_prefix="blocks.{layer}.ffn.",
        mlp={"up": "up_proj.weight", "down": "down_proj.weight"},
        fused="concat",
        kv_heads_keys=(),
        note="fused `Wqkv`: all Q heads, then K, then V",
    ),
    Family(
        "opt",
        {"opt": classic(12, 12, 768)},
        layer="decoder.layers.{layer}.self_attn.",
        tensors={**_PROJ, "o": "out_proj.weight"},
        mlp_prefix="decoder.layers.{layer}.",
        mlp={"fc1": "fc1.weight", "fc2": "fc2.weight"},
        kv_heads_keys=(),
        note="`decoder.layers.N.self_attn.{q,k,v,out}_proj`",
    ),
)
