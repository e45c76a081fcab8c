"""The conformance matrix: a tiny configuration of every supported model type.

Each case is a ``model_type``, the arguments transformers' config class is built with (tiny:
two layers, 64-wide, four query heads, two K/V heads where the family has grouped-query
attention), and what the test knows independently of the plugin: the MLP matrices the model
has (from its modeling code) and whether its Q/K norm spans all heads. The README's
architecture table is checked against this list (``test_readme_table_matches_the_matrix``).
"""

from __future__ import annotations

from dataclasses import dataclass

SMALL = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
}
GQA = {**SMALL, "num_key_value_heads": 2}
GATED = ("gate", "up", "down")
FC = ("fc1", "fc2")
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


@dataclass(frozen=True)
class Case:
    model_type: str
    config: dict[str, object]
    #: the whole-matrix MLP items the model has, in the plugin's names
    mlp: tuple[str, ...] = GATED
    #: Q and K pass through one norm over all heads (OLMo 2): perturbing one head's slice
    #: rescales every head, so the Q/K check looks at the projection's output instead
    joint_qk_norm: bool = False
    #: loads with AutoModel (an encoder) rather than AutoModelForCausalLM
    encoder: bool = False
    #: the whole-matrix attention items beyond q, k, v and o (multi-head latent attention's
    #: down-projections and shared rope key), in the plugin's names
    latent: tuple[str, ...] = ()
    #: the transformers model type that builds it, where checkpoints on the hub name another
    #: in config.json (Kimi K2: DeepseekV3ForCausalLM weights, model_type "kimi_k2")
    built_as: str | None = None


def _case(model_type: str, config: dict[str, object] | None = None, **kw: object) -> Case:
    return Case(model_type, GQA if config is None else config, **kw)  # type: ignore[arg-type]


#: Qwen2-VL's multimodal rotary sections, for head_dim 16
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

#: multi-head latent attention, every dimension different so that a slice of the wrong rows
#: cannot have the right shape: Q heads of 8 + 4 rows (nope + rope), K_nope 8 and V 10 rows of
#: the 16-rank key/value latent, Q acting on a 24-rank query latent
MLA = {
    **SMALL,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 10,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,  # layer 0 dense, layer 1 a mixture of experts, as published
}
#: DeepseekV3Config defaults num_key_value_heads to 128: its attention needs one per query head
MLA_V3 = {**MLA, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4}
LATENT = ("q_a", "kv_a", "k_rope")

CASES: dict[str, Case] = {
    "llama": _case("llama"),
    "mistral": _case("mistral"),
    "ministral": _case("ministral", {**GQA, "head_dim": 16}),
    "mixtral": _case("mixtral", {**GQA, "num_local_experts": 2}, mlp=()),
    "qwen2": _case("qwen2"),
    "qwen2_moe": _case("qwen2_moe", {**GQA, **MOE, "shared_expert_intermediate_size": 32}, mlp=()),
    "qwen3": _case("qwen3", {**GQA, "head_dim": 8}),
    "qwen3_moe": _case("qwen3_moe", {**GQA, **MOE}, mlp=()),
    "gemma": _case("gemma", {**SMALL, "num_key_value_heads": 1, "head_dim": 32}),
    "gemma2": _case("gemma2", {**GQA, "head_dim": 24}),
    "gemma3_text": _case("gemma3_text", {**GQA, "head_dim": 16}),
    "llama4_text": _case(
        "llama4_text",
        {**GQA, "head_dim": 16, "num_local_experts": 2, "intermediate_size_mlp": 128},
        mlp=(),
    ),
    "gpt_oss": _case(
        "gpt_oss", {**GQA, "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 2}, mlp=()
    ),
    "phimoe": _case("phimoe", {**GQA, "num_local_experts": 2}, mlp=()),
    "olmo": _case("olmo"),
    "olmo2": _case("olmo2", joint_qk_norm=True),
    "olmo3": _case("olmo3", joint_qk_norm=True),
    "cohere": _case("cohere"),
    "cohere2": _case("cohere2", {**GQA, "head_dim": 16}),
    "stablelm": _case("stablelm"),
    "granite": _case("granite"),
    "granitemoe": _case("granitemoe", {**GQA, "num_local_experts": 2}, mlp=()),
    "smollm3": _case("smollm3", {**GQA, "pad_token_id": 0}),
    "exaone4": _case("exaone4"),
    "helium": _case("helium", {**GQA, "head_dim": 16}),
    "ernie4_5": _case("ernie4_5", {**GQA, "head_dim": 16}),
    "apertus": _case("apertus", mlp=("up", "down")),
    "seed_oss": _case("seed_oss", {**GQA, "head_dim": 16}),
    "hunyuan_v1_dense": _case("hunyuan_v1_dense", {**GQA, "head_dim": 16}),
    "nemotron": _case("nemotron", {**GQA, "head_dim": 16}, mlp=("up", "down")),
    "arcee": _case("arcee", mlp=("up", "down")),
    "olmoe": _case(
        "olmoe", {**GQA, "num_experts": 2, "num_experts_per_tok": 2}, mlp=(), joint_qk_norm=True
    ),
    "hunyuan_v1_moe": _case(
        "hunyuan_v1_moe", {**GQA, "head_dim": 16, "num_experts": 2, "moe_topk": 2}, mlp=()
    ),
    "granitemoeshared": _case(
        "granitemoeshared", {**GQA, "num_local_experts": 2, "shared_intermediate_size": 32}, mlp=()
    ),
    "deepseek_v2": _case("deepseek_v2", MLA, mlp=(), latent=LATENT),
    "deepseek_v2 (q_lora_rank null)": _case(
        "deepseek_v2", {**MLA, "q_lora_rank": None}, mlp=(), latent=("kv_a", "k_rope")
    ),
    "deepseek_v3": _case("deepseek_v3", MLA_V3, mlp=(), latent=LATENT),
    "kimi_k2": _case("kimi_k2", MLA_V3, mlp=(), latent=LATENT, built_as="deepseek_v3"),
    "starcoder2": _case("starcoder2", mlp=FC),
    "glm": _case("glm", {**GQA, "head_dim": 16, "pad_token_id": 0}, mlp=("gate_up", "down")),
    "glm4": _case("glm4", {**GQA, "head_dim": 16, "pad_token_id": 0}, mlp=("gate_up", "down")),
    "phi": _case("phi", mlp=FC),
    "phi3": _case("phi3", {**GQA, "pad_token_id": 0}, mlp=("gate_up", "down")),
    "gpt2": _case("gpt2", {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128}, mlp=FC),
    "gpt_bigcode": _case(
        "gpt_bigcode", {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128}, mlp=FC
    ),
    "gpt_bigcode (multi_query false)": _case(
        "gpt_bigcode",
        {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128, "multi_query": False},
        mlp=FC,
    ),
    "gptj": _case(
        "gptj",
        {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128, "rotary_dim": 8},
        mlp=FC,
    ),
    "gpt_neox": _case("gpt_neox", SMALL, mlp=FC),
    "bloom": _case(
        "bloom", {"hidden_size": 64, "n_head": 4, "n_layer": 2, "vocab_size": 128}, mlp=FC
    ),
    "falcon (multi-query)": _case("falcon", {**SMALL, "multi_query": True}, mlp=FC),
    "falcon (grouped)": _case(
        "falcon", {**SMALL, "new_decoder_architecture": True, "num_kv_heads": 2}, mlp=FC
    ),
    "falcon (interleaved)": _case("falcon", {**SMALL, "multi_query": False}, mlp=FC),
    "mpt": _case(
        "mpt", {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 128}, mlp=("up", "down")
    ),
    "opt": _case(
        "opt",
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "ffn_dim": 128,
            "vocab_size": 128,
            "word_embed_proj_dim": 64,
        },
        mlp=FC,
    ),
    "bert": _case("bert", SMALL, mlp=FC, encoder=True),
    "roberta": _case("roberta", {**SMALL, "pad_token_id": 1}, mlp=FC, encoder=True),
    "xlm-roberta": _case("xlm-roberta", {**SMALL, "pad_token_id": 1}, mlp=FC, encoder=True),
    "electra": _case("electra", {**SMALL, "embedding_size": 32}, mlp=FC, encoder=True),
    "deberta-v2": _case("deberta-v2", SMALL, mlp=FC, encoder=True),
    "mpnet": _case("mpnet", {**SMALL, "pad_token_id": 1}, mlp=FC, encoder=True),
    "distilbert": _case(
        "distilbert",
        {"dim": 64, "n_heads": 4, "n_layers": 2, "hidden_dim": 128, "vocab_size": 128},
        mlp=FC,
        encoder=True,
    ),
    "modernbert": _case(
        "modernbert", {**SMALL, "pad_token_id": 0}, mlp=("gate_up", "down"), encoder=True
    ),
    "clip_text_model": _case("clip_text_model", SMALL, mlp=FC, encoder=True),
    "llava": _case(
        "llava",
        {
            "text_config": {"model_type": "llama", **GQA},
            "vision_config": {"model_type": "clip_vision_model", **TINY_VISION},
        },
    ),
    "llava_next": _case(
        "llava_next",
        {
            "text_config": {"model_type": "llama", **GQA},
            "vision_config": {"model_type": "clip_vision_model", **TINY_VISION},
            "image_grid_pinpoints": [[32, 32]],
        },
    ),
    "gemma3": _case(
        "gemma3",
        {
            "text_config": {**GQA, "head_dim": 16},
            "vision_config": {"model_type": "siglip_vision_model", **TINY_VISION},
            "mm_tokens_per_image": 4,
        },
    ),
    "qwen2_vl": _case(
        "qwen2_vl",
        {
            "text_config": {
                **GQA,
                "rope_parameters": MROPE,
            },
            "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64},
        },
    ),
    "qwen2_vl_text": _case("qwen2_vl_text", {**GQA, "rope_parameters": MROPE}),
    "qwen2_5_vl_text": _case("qwen2_5_vl_text", {**GQA, "rope_parameters": MROPE}),
    "qwen2_5_vl": _case(
        "qwen2_5_vl",
        {
            "text_config": {
                **GQA,
                "rope_parameters": MROPE,
            },
            "vision_config": {
                "depth": 1,
                "hidden_size": 32,
                "out_hidden_size": 64,
                "num_heads": 2,
                "intermediate_size": 64,
            },
        },
    ),
}
