"""Encoder-decoder models (T5, BART and their descendants, Whisper): one entry per family.

Each has three stacks of items (:data:`~pytest_spectral.checkpoints.families.family.STACKS`):
the encoder's self-attention, the decoder's self-attention and the decoder's cross-attention,
whose K and V act on the encoder's output. Their heads are laid out as a decoder's (one
``nn.Linear`` per matrix, ``head_dim`` rows per head); what differs is where each stack's
tensors live and which config keys count its layers and heads.
"""

from __future__ import annotations

from pytest_spectral.checkpoints.families.family import ConfigClass, Family, Stack

_T5_ATTENTION = {m: f"{m}.weight" for m in "qkvo"}
#: T5's feed-forward: ``wi``/``wo``, or gated (``feed_forward_proj = "gated-gelu"``, mT5,
#: UMT5) ``wi_0`` (the gate), ``wi_1`` and ``wo``; ``wo`` is fc2 in both, as one name
#: cannot depend on which others are present
_T5_MLP = {
    "fc1": "DenseReluDense.wi.weight",
    "gate": "DenseReluDense.wi_0.weight",
    "up": "DenseReluDense.wi_1.weight",
    "fc2": "DenseReluDense.wo.weight",
}
_T5_HEADS = ("num_heads",)


def _t5(layers: int, heads: int, d_model: int, d_kv: int) -> ConfigClass:
    """``T5Config`` and its descendants: ``d_kv`` is the head size whatever ``d_model`` is,
    and ``num_decoder_layers`` defaults to ``num_layers``."""
    return ConfigClass(
        {"num_layers": layers, "num_heads": heads, "d_model": d_model, "d_kv": d_kv},
        aliases={
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "d_model": "hidden_size",
            "d_kv": "head_dim",
        },
        same_as={"num_decoder_layers": "num_layers"},
    )


def _t5_stack(
    name: str, block: str, module: str, layers_key: str, *, at: int, mlp_at: int | None
) -> Stack:
    """A T5 stack: ``{block}.block.N.layer.{at}.{module}``, its feed-forward at sub-layer
    ``mlp_at`` (``None``: the stack has none of its own)."""
    return Stack(
        name,
        layer=f"{block}.block.{{layer}}.layer.{at}.{module}.",
        tensors=_T5_ATTENTION,
        layers_keys=(layers_key,),
        heads_keys=_T5_HEADS,
        mlp_prefix="" if mlp_at is None else f"{block}.block.{{layer}}.layer.{mlp_at}.",
        mlp={} if mlp_at is None else _T5_MLP,
    )


_BART_ALIASES = {
    "encoder_attention_heads": "num_attention_heads",
    "d_model": "hidden_size",
    "encoder_layers": "num_hidden_layers",
}


def _bart(
    layers: int, heads: int, d_model: int, *, decoder_layers: int | None = None, **aliases: str
) -> ConfigClass:
    """``BartConfig`` and the classes copied from it: both stacks' layer and head counts have
    keys of their own; ``num_attention_heads``, ``hidden_size`` and ``num_hidden_layers``
    alias the encoder's (``aliases`` adds a class's others)."""
    return ConfigClass(
        {
            "encoder_layers": layers,
            "decoder_layers": layers if decoder_layers is None else decoder_layers,
            "encoder_attention_heads": heads,
            "decoder_attention_heads": heads,
            "d_model": d_model,
        },
        aliases={**_BART_ALIASES, **aliases},
    )


_BART_PROJ = {**{m: f"{m}_proj.weight" for m in "qkv"}, "o": "out_proj.weight"}
_BART_MLP = {"fc1": "fc1.weight", "fc2": "fc2.weight"}


def _bart_stack(name: str, block: str, module: str, *, mlp: bool) -> Stack:
    """A BART stack: ``{block}.layers.N.{module}``, with the layer's MLP or without (the
    cross-attention shares its layer's MLP with the decoder's self-attention)."""
    return Stack(
        name,
        layer=f"{block}.layers.{{layer}}.{module}.",
        tensors=_BART_PROJ,
        layers_keys=(f"{block}_layers",),
        heads_keys=(f"{block}_attention_heads",),
        mlp_prefix=f"{block}.layers.{{layer}}.",
        mlp=_BART_MLP if mlp else {},
    )


def _encoder_decoder(
    name: str,
    configs: dict[str, ConfigClass],
    note: str,
    stacks: tuple[Stack, ...],
    head_dim_keys: tuple[str, ...] = (),
) -> Family:
    """A family of stacks; one K/V head per query head, ``d_model`` wide."""
    first = stacks[0]
    return Family(
        name,
        configs,
        layer=first.layer,
        tensors=first.tensors,
        kv_heads_keys=(),
        hidden_keys=("d_model",),
        head_dim_keys=head_dim_keys,
        note=note,
        stacks=stacks,
    )


ENCODER_DECODERS: tuple[Family, ...] = (
    _encoder_decoder(
        "t5",
        {
            "t5": _t5(6, 8, 512, 64),
            "mt5": _t5(8, 6, 512, 64),
            "umt5": _t5(8, 6, 512, 64),
        },
        "`{encoder,decoder}.block.N.layer.0.SelfAttention.{q,k,v,o}`, cross-attention "
        "`decoder.block.N.layer.1.EncDecAttention`; head size `d_kv`",
        (
            _t5_stack("encoder", "encoder", "SelfAttention", "num_layers", at=0, mlp_at=1),
            _t5_stack("decoder", "decoder", "SelfAttention", "num_decoder_layers", at=0, mlp_at=2),
            _t5_stack(
                "cross", "decoder", "EncDecAttention", "num_decoder_layers", at=1, mlp_at=None
            ),
        ),
        head_dim_keys=("d_kv",),
    ),
    _encoder_decoder(
        "bart",
        {
            "bart": _bart(12, 16, 1024),
            "mbart": _bart(12, 16, 1024),
            "marian": _bart(12, 16, 1024),
            "pegasus": _bart(12, 16, 1024),
            "whisper": _bart(4, 6, 384),
            "plbart": _bart(6, 12, 768),
            "blenderbot": _bart(2, 32, 2560, decoder_layers=24),
            "blenderbot-small": _bart(8, 16, 512),
            "m2m_100": _bart(12, 16, 1024),
        },
        "`{encoder,decoder}.layers.N.self_attn.{q,k,v,out}_proj`, cross-attention "
        "`decoder.layers.N.encoder_attn`",
        (
            _bart_stack("encoder", "encoder", "self_attn", mlp=True),
            _bart_stack("decoder", "decoder", "self_attn", mlp=True),
            _bart_stack("cross", "decoder", "encoder_attn", mlp=False),
        ),
    ),
)
