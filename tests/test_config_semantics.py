"""config.json means what it means to transformers, without transformers at run time.

For every supported model type, the config transformers' own class writes for the tiny model
of the conformance matrix is read with each key left out in turn (each key of a nested
``text_config`` too): the plugin's geometry must be the one transformers' config class gives
for the same dict (``from_dict``, as ``from_pretrained`` reads ``config.json``), with its class
defaults, attribute aliases (``n_head``, ``n_embd``...) and default ``head_dim``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from architecture_matrix import CASES, ENCODER_DECODER_CASES

from pytest_spectral.checkpoints.checkpoint import Geometry, interpret_config
from pytest_spectral.checkpoints.families import Latent
from pytest_spectral.errors import CheckpointError

transformers = pytest.importorskip("transformers")
SOURCE = Path("config.json")


def reference_geometry(model_type: str, text) -> Geometry:
    """The head geometry transformers' attention modules build from the text ``config``."""
    heads, hidden = text.num_attention_heads, text.hidden_size
    if getattr(text, "kv_lora_rank", None) is not None:  # DeepseekV3Attention
        latent = Latent(
            text.q_lora_rank,
            text.kv_lora_rank,
            text.qk_nope_head_dim,
            text.qk_rope_head_dim,
            text.v_head_dim,
        )
        head_dim = text.qk_nope_head_dim + text.qk_rope_head_dim  # one K/V head per query head
        return Geometry(text.num_hidden_layers, heads, heads, head_dim, hidden, latent)
    if model_type == "falcon":  # FalconAttention
        kv_heads = (
            text.num_kv_heads if text.new_decoder_architecture else 1 if text.multi_query else heads
        )
    elif model_type == "gpt_bigcode":  # GPTBigCodeAttention
        kv_heads = 1 if text.multi_query else heads
    else:  # the attention modules: config.num_key_value_heads where the class has one
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return Geometry(text.num_hidden_layers, heads, kv_heads, head_dim, hidden)


def buildable(g: Geometry, text) -> bool:
    """Whether attention modules could be built with ``g`` (no remainder heads, no empty head):
    transformers' config classes accept some configs their models cannot use (64 wide with
    12 heads), which the plugin refuses."""
    derived = getattr(text, "head_dim", None) is None
    return g.heads % g.kv_heads == 0 and g.head_dim >= 2 and not (derived and g.hidden % g.heads)


def variants(full: dict) -> list[tuple[str, dict]]:
    """``full`` without each of its keys in turn, and without each key of its text_config."""
    out = [
        (key, {k: v for k, v in full.items() if k != key}) for key in full if key != "model_type"
    ]
    nested = full.get("text_config")
    if isinstance(nested, dict):
        for key in nested:
            text = {k: v for k, v in nested.items() if k != key}
            out.append((f"text_config.{key}", {**full, "text_config": text}))
    return out


MODEL_TYPES = sorted({case.model_type: name for name, case in CASES.items()}.items())


@pytest.mark.parametrize(("model_type", "case"), MODEL_TYPES, ids=[t for t, _ in MODEL_TYPES])
def test_each_key_left_out_reads_as_transformers_reads_it(model_type: str, case: str) -> None:
    """A type ``built_as`` another (Kimi K2) is read with that type's config class, which its
    checkpoints' own (remote) code uses."""
    built_as = CASES[case].built_as or model_type
    if built_as not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {built_as!r}")
    config_class = transformers.CONFIG_MAPPING[built_as]
    full = {**config_class(**CASES[case].config).to_dict(), "model_type": model_type}
    compared = 0
    for key, config in [("(none)", full), *variants(full)]:
        try:
            text = config_class.from_dict(dict(config)).get_text_config()
        except Exception:  # transformers refuses this config too: nothing to compare
            continue
        expected = reference_geometry(model_type, text)
        if not buildable(expected, text):
            with pytest.raises(CheckpointError):
                interpret_config(config, SOURCE)
            continue
        try:
            geometry = interpret_config(config, SOURCE)[3]
        except CheckpointError as exc:
            pytest.fail(f"without {key}: refused ({exc}), transformers reads {expected}")
        assert geometry == expected, f"without {key}"
        compared += 1
    assert compared > len(full) // 2


def test_llava_1_5_as_published() -> None:
    """llava-hf/llava-1.5-7b-hf writes only the text keys that differ from LlamaConfig's."""
    config = {
        "model_type": "llava",
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "vision_config": {"model_type": "clip_vision_model"},
    }
    expected = Geometry(layers=32, heads=32, kv_heads=32, head_dim=128, hidden=4096)
    assert interpret_config(config, SOURCE)[3] == expected
    reference = transformers.CONFIG_MAPPING["llava"].from_dict(config).get_text_config()
    assert reference_geometry("llava", reference) == expected


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # MistralConfig: num_key_value_heads defaults to 8
        ({"model_type": "mistral", "hidden_size": 128, "num_attention_heads": 16}, (8, 8)),
        # FalconConfig: num_kv_heads defaults to num_attention_heads
        (
            {
                "model_type": "falcon",
                "hidden_size": 128,
                "num_attention_heads": 16,
                "new_decoder_architecture": True,
            },
            (16, 8),
        ),
        # Gemma: head_dim 256 whatever the hidden size
        ({"model_type": "gemma", "hidden_size": 128, "num_attention_heads": 16}, (16, 256)),
        # GPT-2's aliases
        ({"model_type": "gpt2", "n_embd": 128, "n_head": 4, "n_layer": 2}, (4, 32)),
        # DeepSeek-V2-Lite: q_lora_rank null is no query latent (Q from q_proj), not 1536
        (
            {
                "model_type": "deepseek_v2",
                "hidden_size": 128,
                "num_attention_heads": 4,
                "q_lora_rank": None,
                "qk_nope_head_dim": 16,
                "qk_rope_head_dim": 8,
            },
            (4, 24),
        ),
        # DeepseekV3Config: num_key_value_heads 128 is not what MLA's K/V heads follow
        ({"model_type": "deepseek_v3", "num_attention_heads": 4}, (4, 192)),
        # Qwen2-VL as published: the text keys at the top level
        (
            {
                "model_type": "qwen2_vl",
                "hidden_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
            (2, 32),
        ),
    ],
    ids=["mistral", "falcon", "gemma", "gpt2", "deepseek_v2_lite", "deepseek_v3", "qwen2_vl"],
)
def test_class_defaults_by_hand(config: dict, expected: tuple[int, int]) -> None:
    geometry = interpret_config(config, SOURCE)[3]
    assert (geometry.kv_heads, geometry.head_dim) == expected


def stacks_as_transformers_reads_them(config) -> dict[str, tuple[int, int, int, int]]:
    """(layers, heads, head size, width) of each stack, from transformers' config object:
    T5's classes name ``num_layers``, ``num_decoder_layers``, ``num_heads`` and ``d_kv``, the
    head size; BART's and Whisper's count each stack's layers and heads apart, and their
    attention modules split ``d_model`` among the heads."""
    if hasattr(config, "d_kv"):
        heads = (config.num_heads,) * 2
        layers = (config.num_layers, config.num_decoder_layers)
        sizes = (config.d_kv,) * 2
    else:
        heads = (config.encoder_attention_heads, config.decoder_attention_heads)
        layers = (config.encoder_layers, config.decoder_layers)
        sizes = tuple(config.d_model // h for h in heads)
    return {
        "encoder": (layers[0], heads[0], sizes[0], config.d_model),
        "decoder": (layers[1], heads[1], sizes[1], config.d_model),
        "cross": (layers[1], heads[1], sizes[1], config.d_model),
    }


ENCODER_DECODER_TYPES = sorted(
    {case.model_type: name for name, case in ENCODER_DECODER_CASES.items()}.items()
)


@pytest.mark.parametrize(
    ("model_type", "case"), ENCODER_DECODER_TYPES, ids=[t for t, _ in ENCODER_DECODER_TYPES]
)
def test_each_key_of_an_encoder_decoder_left_out_reads_as_transformers_reads_it(
    model_type: str, case: str
) -> None:
    """Each stack's layers, heads, head size and width, with each key left out in turn (and
    with T5's and BART's aliases written instead of the keys): T5's ``num_decoder_layers``
    defaults to ``num_layers``, and ``d_kv`` is the head size whatever ``d_model`` is."""
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    config_class = transformers.CONFIG_MAPPING[model_type]
    full = config_class(**ENCODER_DECODER_CASES[case].config).to_dict()
    aliased = dict(full)
    for standard, stored in config_class.attribute_map.items():
        if stored in aliased and standard in ("num_hidden_layers", "num_attention_heads"):
            aliased[standard] = aliased.pop(stored)
    compared = 0
    for key, config in [("(none)", full), ("(aliases)", aliased), *variants(full)]:
        expected = stacks_as_transformers_reads_them(config_class.from_dict(dict(config)))
        if len({shape[1:] for shape in expected.values()}) > 1 or any(
            size < 2 for _, _, size, _ in expected.values()
        ):  # stacks with different heads: refused (see the README)
            with pytest.raises(CheckpointError):
                interpret_config(config, SOURCE)
            continue
        try:
            _, _, _, geometry, _, stacks = interpret_config(config, SOURCE)
        except CheckpointError as exc:
            pytest.fail(f"without {key}: refused ({exc}), transformers reads {expected}")
        read = {
            span.name: (span.layers, geometry.heads, geometry.head_dim, geometry.hidden)
            for span in stacks
        }
        assert read == expected, f"without {key}"
        assert geometry.layers == sum(span.layers for span in stacks)
        compared += 1
    assert compared > len(full) // 2


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # T5Config: num_decoder_layers defaults to num_layers; d_kv 64 whatever d_model is
        (
            {"model_type": "t5", "d_model": 128, "num_heads": 4, "num_layers": 3},
            {"encoder": 3, "decoder": 3, "cross": 3, "head_dim": 64},
        ),
        # its aliases: num_hidden_layers is num_layers
        (
            {"model_type": "t5", "d_model": 128, "num_heads": 4, "num_hidden_layers": 5},
            {"encoder": 5, "decoder": 5, "cross": 5, "head_dim": 64},
        ),
        # WhisperConfig: 4 layers of 6 heads per stack, d_model 384 (whisper-tiny)
        (
            {"model_type": "whisper"},
            {"encoder": 4, "decoder": 4, "cross": 4, "head_dim": 64},
        ),
    ],
    ids=["t5", "t5-aliases", "whisper"],
)
def test_encoder_decoder_class_defaults_by_hand(config: dict, expected: dict) -> None:
    _, _, _, geometry, _, stacks = interpret_config(config, SOURCE)
    assert {span.name: span.layers for span in stacks} | {"head_dim": geometry.head_dim} == (
        expected
    )


def test_stacks_with_different_heads_are_refused_naming_both() -> None:
    config = {
        "model_type": "bart",
        "d_model": 64,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 8,
    }
    with pytest.raises(CheckpointError, match="the decoder stack has 8 heads of size 8 "):
        interpret_config(config, SOURCE)


#: config keys that decide which layers of a mixture of experts are sparse
SCHEDULE_KEYS = (
    "decoder_sparse_step",
    "mlp_only_layers",
    "num_experts",
    "num_local_experts",
    "first_k_dense_replace",
    "moe_layer_start_index",
    "moe_layer_end_index",
    "moe_layer_interval",
    "moe_layers",
    "interleave_moe_layer_step",
)
MOE_CASES = sorted(name for name, case in CASES.items() if case.experts)


@pytest.mark.parametrize("case", MOE_CASES)
def test_sparse_layers_with_each_schedule_key_left_out_are_transformers(case: str) -> None:
    """The layers a mixture of experts makes sparse, with each key that decides them left out
    in turn (class defaults apply), are those transformers builds with experts."""
    from test_architectures import sparse_layers

    model_type = CASES[case].model_type
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    config_class = transformers.CONFIG_MAPPING[model_type]
    full = config_class(**CASES[case].config).to_dict()
    left_out = [("(none)", full)] + [
        (key, {k: v for k, v in full.items() if k != key}) for key in SCHEDULE_KEYS if key in full
    ]
    for key, config in left_out:
        resolved, family, _, geometry, _, _ = interpret_config(config, SOURCE)
        schedule = family.moe[model_type].schedule
        model = transformers.AutoModelForCausalLM.from_config(config_class.from_dict(dict(config)))
        assert set(schedule(resolved, geometry.layers)) == sparse_layers(model), f"without {key}"


def test_deepseek_v2_lite_reads_its_queries_from_q_proj() -> None:
    """``q_lora_rank: null`` in config.json: queries from ``q_proj`` on the hidden state, no
    ``q_a_proj``; as DeepseekV2Config reads it (the attribute stays None)."""
    config = {"model_type": "deepseek_v2", "q_lora_rank": None, "hidden_size": 128}
    _, family, _, geometry, _, _ = interpret_config(config, SOURCE)
    assert geometry.latent is not None
    assert geometry.latent.q_lora_rank is None
    assert geometry.slice_shape("q") == (192, 128)
    assert family.tensors["q"] == "q_proj.weight"
    assert "q_a" not in family.tensors
    assert transformers.CONFIG_MAPPING["deepseek_v2"].from_dict(config).q_lora_rank is None


@pytest.mark.parametrize("experts", [0, 4])
def test_qwen3_moe_counts_its_experts_from_num_local_experts(experts: int) -> None:
    """Qwen3MoeConfig stores ``num_experts`` as ``num_local_experts`` (its attribute_map): with
    none, every layer is dense, as transformers builds it."""
    from test_architectures import sparse_layers

    config_class = transformers.CONFIG_MAPPING["qwen3_moe"]
    config = config_class(**{**CASES["qwen3_moe"].config, "num_experts": experts}).to_dict()
    assert config["num_local_experts"] == experts
    assert "num_experts" not in config
    resolved, family, _, geometry, _, _ = interpret_config(config, SOURCE)
    model = transformers.AutoModelForCausalLM.from_config(config_class.from_dict(dict(config)))
    assert set(family.moe["qwen3_moe"].schedule(resolved, geometry.layers)) == sparse_layers(model)
    assert bool(sparse_layers(model)) == bool(experts)
