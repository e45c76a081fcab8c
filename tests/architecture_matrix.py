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
#: a vision tower unlike its text model (3 layers, not 2; 4 heads of 8, not of 16; 32 wide,
#: not 64), so that a tower read with the text model's geometry, or the text model's with the
#: tower's, cannot have the right shapes
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
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
    #: a mixture of experts: routed experts per sparse layer (which layers are sparse is read
    #: from the model transformers builds), and a sparse layer's other whole matrices;
    #: ``mlp`` is then a dense layer's
    experts: int = 0
    moe: tuple[str, ...] = ()
    #: how transformers 5's expert parameters hold gate, up and down (its modeling code):
    #: "chunk" ``gate_up_proj[e]`` [2I, H], gate then up, ``down_proj[e]`` [H, I];
    #: "transposed" [H, 2I] halves and [I, H] (Llama 4); "interleaved" [H, 2I] with
    #: gate = ``[..., ::2]``, up = ``[..., 1::2]`` (gpt-oss)
    expert_form: str = "chunk"
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
ROUTER = ("router",)
GLM_MOE = {
    "n_routed_experts": 3,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
}
SHARED = ("router", "shared-gate", "shared-up", "shared-down")

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
    "mixtral": _case("mixtral", {**GQA, "num_local_experts": 3}, mlp=(), experts=3, moe=ROUTER),
    "qwen2": _case("qwen2"),
    "qwen2_moe": _case(
        "qwen2_moe",
        {**GQA, **MOE, "shared_expert_intermediate_size": 32},
        mlp=(),
        experts=4,
        moe=SHARED,
    ),
    "qwen2_moe (decoder_sparse_step 2)": _case(
        "qwen2_moe",
        {**GQA, **MOE, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 2},
        experts=4,
        moe=SHARED,
    ),
    "qwen3": _case("qwen3", {**GQA, "head_dim": 8}),
    "qwen3_moe": _case("qwen3_moe", {**GQA, **MOE}, mlp=(), experts=4, moe=ROUTER),
    "qwen3_moe (mlp_only_layers)": _case(
        "qwen3_moe", {**GQA, **MOE, "mlp_only_layers": [0]}, experts=4, moe=ROUTER
    ),
    "glm4_moe": _case(
        "glm4_moe",
        {**GQA, "head_dim": 16, **GLM_MOE, "first_k_dense_replace": 1},
        experts=3,
        moe=SHARED,
    ),
    "dots1": _case(
        "dots1",
        {**GQA, "head_dim": 16, **GLM_MOE, "first_k_dense_replace": 1},
        experts=3,
        moe=SHARED,
    ),
    "ernie4_5_moe": _case(
        "ernie4_5_moe",
        {
            **GQA,
            "head_dim": 16,
            "moe_num_experts": 3,
            "moe_k": 2,
            "moe_intermediate_size": 32,
            "moe_num_shared_experts": 1,
            "moe_layer_start_index": 1,
        },
        experts=3,
        moe=SHARED,
    ),
    "gemma": _case("gemma", {**SMALL, "num_key_value_heads": 1, "head_dim": 32}),
    "gemma2": _case("gemma2", {**GQA, "head_dim": 24}),
    "gemma3_text": _case("gemma3_text", {**GQA, "head_dim": 16}),
    "llama4_text": _case(
        "llama4_text",
        {**GQA, "head_dim": 16, "num_local_experts": 2, "intermediate_size_mlp": 128},
        mlp=(),
        experts=2,
        moe=SHARED,
        expert_form="transposed",
    ),
    "llama4_text (interleave_moe_layer_step 2)": _case(
        "llama4_text",
        {
            **GQA,
            "head_dim": 16,
            "num_local_experts": 2,
            "intermediate_size_mlp": 128,
            "interleave_moe_layer_step": 2,
        },
        experts=2,
        moe=SHARED,
        expert_form="transposed",
    ),
    "gpt_oss": _case(
        "gpt_oss",
        {**GQA, "head_dim": 16, "num_local_experts": 3, "num_experts_per_tok": 2},
        mlp=(),
        experts=3,
        moe=ROUTER,
        expert_form="interleaved",
    ),
    "phimoe": _case("phimoe", {**GQA, "num_local_experts": 2}, mlp=(), experts=2, moe=ROUTER),
    "olmo": _case("olmo"),
    "olmo2": _case("olmo2", joint_qk_norm=True),
    "olmo3": _case("olmo3", joint_qk_norm=True),
    "cohere": _case("cohere"),
    "cohere2": _case("cohere2", {**GQA, "head_dim": 16}),
    "stablelm": _case("stablelm"),
    "granite": _case("granite"),
    "granitemoe": _case(
        "granitemoe", {**GQA, "num_local_experts": 2}, mlp=(), experts=2, moe=ROUTER
    ),
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
        "olmoe",
        {**GQA, "num_experts": 2, "num_experts_per_tok": 2},
        mlp=(),
        joint_qk_norm=True,
        experts=2,
        moe=ROUTER,
    ),
    "hunyuan_v1_moe": _case(
        "hunyuan_v1_moe",
        {**GQA, "head_dim": 16, "num_experts": 2, "moe_topk": 2},
        mlp=(),
        experts=2,
        moe=SHARED,
    ),
    "granitemoeshared": _case(
        "granitemoeshared",
        {**GQA, "num_local_experts": 2, "shared_intermediate_size": 32},
        mlp=(),
        experts=2,
        moe=("router", "shared-gate_up", "shared-down"),
    ),
    "deepseek_v2": _case("deepseek_v2", MLA, latent=LATENT, experts=4, moe=SHARED),
    "deepseek_v2 (q_lora_rank null)": _case(
        "deepseek_v2",
        {**MLA, "q_lora_rank": None},
        latent=("kv_a", "k_rope"),
        experts=4,
        moe=SHARED,
    ),
    "deepseek_v3": _case("deepseek_v3", MLA_V3, latent=LATENT, experts=4, moe=SHARED),
    "kimi_k2": _case(
        "kimi_k2", MLA_V3, latent=LATENT, built_as="deepseek_v3", experts=4, moe=SHARED
    ),
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
    "vit": _case("vit", {**SMALL, "image_size": 32, "patch_size": 8}, mlp=FC, encoder=True),
    "clip_vision_model": _case(
        "clip_vision_model", {**SMALL, "image_size": 32, "patch_size": 8}, mlp=FC, encoder=True
    ),
    "siglip_vision_model": _case(
        "siglip_vision_model", {**SMALL, "image_size": 32, "patch_size": 8}, mlp=FC, encoder=True
    ),
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
            "vision_config": {"depth": 3, "embed_dim": 32, "num_heads": 4, "hidden_size": 64},
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
                "depth": 3,
                "hidden_size": 32,
                "out_hidden_size": 64,
                "num_heads": 4,
                "intermediate_size": 64,
            },
        },
    ),
}


#: the multimodal wrappers, whose vision tower --spectral-vision analyses (test_vision.py)
VISION_CASES: tuple[str, ...] = ("llava", "llava_next", "gemma3", "qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class EncoderDecoderCase:
    """An encoder-decoder model type: tiny, with fewer encoder than decoder layers (2 and 3),
    so that a count mixing the stacks up is wrong; what the test knows independently: the MLP
    matrices of its encoder and decoder layers (from its modeling code) and whether it reads
    audio features (Whisper) rather than token ids."""

    model_type: str
    config: dict[str, object]
    mlp: tuple[str, ...] = FC
    audio: bool = False
    encoder_layers: int = 2
    decoder_layers: int = 3


#: T5's geometry: the head size d_kv (8) is not d_model / heads (16)
T5_SMALL = {
    "d_model": 64,
    "d_kv": 8,
    "num_heads": 4,
    "num_layers": 2,
    "num_decoder_layers": 3,
    "d_ff": 128,
    "vocab_size": 128,
    "decoder_start_token_id": 0,
}
BART_SMALL = {
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 3,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}
T5_GATED = ("gate", "up", "fc2")

ENCODER_DECODER_CASES: dict[str, EncoderDecoderCase] = {
    "t5": EncoderDecoderCase("t5", T5_SMALL),
    "t5 (gated-gelu)": EncoderDecoderCase(
        "t5", {**T5_SMALL, "feed_forward_proj": "gated-gelu"}, mlp=T5_GATED
    ),
    "mt5": EncoderDecoderCase("mt5", T5_SMALL, mlp=T5_GATED),
    "umt5": EncoderDecoderCase("umt5", T5_SMALL, mlp=T5_GATED),
    "bart": EncoderDecoderCase("bart", BART_SMALL),
    "mbart": EncoderDecoderCase("mbart", BART_SMALL),
    "marian": EncoderDecoderCase("marian", {**BART_SMALL, "decoder_vocab_size": 128}),
    "pegasus": EncoderDecoderCase("pegasus", BART_SMALL),
    "plbart": EncoderDecoderCase("plbart", BART_SMALL),
    "blenderbot": EncoderDecoderCase("blenderbot", BART_SMALL),
    "blenderbot-small": EncoderDecoderCase("blenderbot-small", BART_SMALL),
    "m2m_100": EncoderDecoderCase("m2m_100", BART_SMALL),
    "whisper": EncoderDecoderCase(
        "whisper",
        {
            **BART_SMALL,
            "num_mel_bins": 8,
            "max_source_positions": 16,
            "max_target_positions": 16,
            "pad_token_id": 1,
            "decoder_start_token_id": 2,
            "begin_suppress_tokens": None,
            "suppress_tokens": None,
        },
        audio=True,
    ),
}
