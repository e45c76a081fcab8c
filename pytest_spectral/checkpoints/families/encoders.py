"""Encoder-only models (BERT and its descendants, CLIP's and SigLIP's text and vision encoders,
ViT): one entry per family.

Every head of an encoder attends both ways; the layout questions are the same as a decoder's.
"""

from __future__ import annotations

from pytest_spectral.checkpoints.families.family import Family, classic

_BERT_MLP = {"fc1": "intermediate.dense.weight", "fc2": "output.dense.weight"}

ENCODERS: tuple[Family, ...] = (
    Family(
        "bert",
        {
            "bert": classic(12, 12, 768),
            "roberta": classic(12, 12, 768),
            "xlm-roberta": classic(12, 12, 768),
            "electra": classic(12, 4, 256),
        },
        layer="encoder.layer.{layer}.attention.",
        tensors={
            "q": "self.query.weight",
            "k": "self.key.weight",
            "v": "self.value.weight",
            "o": "output.dense.weight",
        },
        mlp_prefix="encoder.layer.{layer}.",
        mlp=_BERT_MLP,
        kv_heads_keys=(),
        note="`encoder.layer.N.attention.self.{query,key,value}`, `attention.output.dense`",
    ),
    Family(
        "deberta-v2",
        {"deberta-v2": classic(24, 24, 1536)},
        layer="encoder.layer.{layer}.attention.",
        tensors={
            "q": "self.query_proj.weight",
            "k": "self.key_proj.weight",
            "v": "self.value_proj.weight",
            "o": "output.dense.weight",
        },
        mlp_prefix="encoder.layer.{layer}.",
        mlp=_BERT_MLP,
        kv_heads_keys=(),
        note="`encoder.layer.N.attention.self.{query,key,value}_proj`, `attention.output.dense`",
    ),
    Family(
        "mpnet",
        {"mpnet": classic(12, 12, 768)},
        layer="encoder.layer.{layer}.attention.attn.",
        tensors={m: f"{m}.weight" for m in "qkvo"},
        mlp_prefix="encoder.layer.{layer}.",
        mlp=_BERT_MLP,
        kv_heads_keys=(),
        note="`encoder.layer.N.attention.attn.{q,k,v,o}`",
    ),
    Family(
        "distilbert",
        {
            "distilbert": classic(
                6,
                12,
                768,
                aliases={
                    "hidden_size": "dim",
                    "num_attention_heads": "n_heads",
                    "num_hidden_layers": "n_layers",
                },
            )
        },
        layer="transformer.layer.{layer}.attention.",
        tensors={**{m: f"{m}_lin.weight" for m in "qkv"}, "o": "out_lin.weight"},
        mlp_prefix="transformer.layer.{layer}.ffn.",
        mlp={"fc1": "lin1.weight", "fc2": "lin2.weight"},
        kv_heads_keys=(),
        note="`transformer.layer.N.attention.{q,k,v,out}_lin`",
    ),
    Family(
        "modernbert",
        {"modernbert": classic(22, 12, 768)},
        layer="layers.{layer}.attn.",
        tensors={"qkv": "Wqkv.weight", "o": "Wo.weight"},
        mlp_prefix="layers.{layer}.mlp.",
        mlp={"gate_up": "Wi.weight", "down": "Wo.weight"},
        fused="concat",
        kv_heads_keys=(),
        note="fused `Wqkv`: all Q heads, then K, then V",
    ),
    Family(
        "vit",
        {"vit": classic(12, 12, 768)},
        layer="encoder.layer.{layer}.attention.",
        tensors={
            "q": "attention.query.weight",
            "k": "attention.key.weight",
            "v": "attention.value.weight",
            "o": "output.dense.weight",
        },
        mlp_prefix="encoder.layer.{layer}.",
        mlp=_BERT_MLP,
        kv_heads_keys=(),
        note="`encoder.layer.N.attention.attention.{query,key,value}`, `attention.output.dense`",
    ),
    Family(
        "clip_text_model",
        {
            "clip_text_model": classic(12, 8, 512),
            "clip_vision_model": classic(12, 12, 768),
            "siglip_vision_model": classic(12, 12, 768),
        },
        layer="encoder.layers.{layer}.self_attn.",
        tensors={**{m: f"{m}_proj.weight" for m in "qkv"}, "o": "out_proj.weight"},
        mlp_prefix="encoder.layers.{layer}.mlp.",
        mlp={"fc1": "fc1.weight", "fc2": "fc2.weight"},
        kv_heads_keys=(),
        head_dim_keys=(),  # CLIPAttention, SiglipAttention: hidden_size // num_attention_heads
        note="`encoder.layers.N.self_attn.{q,k,v,out}_proj`",
    ),
)
