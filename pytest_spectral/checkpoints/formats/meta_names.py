"""Meta's and Mistral's native tensor names, as transformers names them after conversion.

Llama's and Mistral's reference code (and checkpoints written by it: Mistral's
``consolidated.safetensors``, Meta's ``consolidated.00.pth``, torchtitan's distributed
checkpoints) name a layer's weights ``layers.N.attention.wq.weight``...
``layers.N.feed_forward.w1.weight``, and keep Q and K rows in the interleaved rotary order of
their complex-number RoPE. transformers' conversion scripts (``convert_mistral_weights_to_hf.py``,
``convert_llama_weights_to_hf.py``) rename them and reorder Q and K rows per head
(``permute_for_rope``); :func:`with_transformers_names` gives each such tensor its
transformers name with that reordering, keeping whatever prefix it had.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from pytest_spectral.checkpoints.formats.sources import RotaryHalves, TensorSource

_NATIVE = re.compile(
    r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\."
    r"(?P<module>attention\.w[qkvo]|feed_forward\.w[123])\.weight$"
)
#: native module -> transformers module (convert_mistral_weights_to_hf.py's STATE_DICT_MAPPING)
TRANSFORMERS_MODULES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_ROTARY = ("attention.wq", "attention.wk")


def transformers_name(native: str) -> str | None:
    """The transformers name of a native layer weight, or None for any other name."""
    match = _NATIVE.match(native)
    if match is None:
        return None
    module = TRANSFORMERS_MODULES[match["module"]]
    return f"{match['prefix']}layers.{match['layer']}.{module}.weight"


def native_or(wanted: Callable[[str], bool]) -> Callable[[str], bool]:
    """``wanted`` extended to native names whose transformers name it wants."""

    def accepts(name: str) -> bool:
        renamed = transformers_name(name)
        return wanted(name) or (renamed is not None and wanted(renamed))

    return accepts


def with_transformers_names(
    tensors: Mapping[str, TensorSource], head_dim: int
) -> dict[str, TensorSource]:
    """``tensors``, plus each native-named one under its transformers name (Q and K rows
    reordered to transformers' half-split rotary order)."""
    named = dict(tensors)
    for name, source in tensors.items():
        match = _NATIVE.match(name)
        if match is None:
            continue
        renamed = transformers_name(name)
        assert renamed is not None
        named[renamed] = RotaryHalves(source, head_dim) if match["module"] in _ROTARY else source
    return named
