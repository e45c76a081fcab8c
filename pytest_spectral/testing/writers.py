"""Small checkpoints in formats other than Hugging Face's, for tests.

Each writer takes weights under their Hugging Face names (``model.layers.0.self_attn.q_proj
.weight``, as :func:`~pytest_spectral.testing.synthetic.random_llama_weights` gives them) and
stores them the way the format's own converter does, conventions included:

* :func:`write_gguf`: llama.cpp's ``convert_hf_to_gguf.py`` (``blk.N.attn_q.weight``, Q and K
  rows permuted to the interleaved rotary order for ``llama``, GPT-2's ``Conv1D`` weights
  transposed), written with the ``gguf`` package's own writer and quantizer;
* :func:`write_mistral_native`: Mistral's ``params.json`` + ``consolidated.safetensors``
  (``layers.N.attention.wq.weight``, Q and K rows in the same interleaved order).

The permutation is written from its definition (llama.cpp's ``LlamaModel.permute``), not taken
from the plugin, so that tests of the plugin's reading are tests against the converters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pytest_spectral.testing.synthetic import LlamaShape


def interleave_rotary(weight: np.ndarray, head_dim: int) -> np.ndarray:
    """HF's half-split Q/K rows to Meta's interleaved order, per head: llama.cpp's
    ``permute`` (``reshape(n_head, 2, d // 2, in).swapaxes(1, 2)``)."""
    rows, columns = weight.shape
    heads = rows // head_dim
    return weight.reshape(heads, 2, head_dim // 2, columns).swapaxes(1, 2).reshape(rows, columns)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_LAYER = re.compile(r"^(?:model\.|transformer\.)?(?:layers|h)\.(\d+)\.(.+)\.weight$")


def write_gguf(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    architecture: str,
    layers: int,
    heads: int,
    kv_heads: int,
    hidden: int,
    head_dim: int | None = None,
    quantization: str | Mapping[str, str] = "F32",
    name: str = "tiny",
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write the layer tensors of ``tensors`` as llama.cpp would: GGUF names, Q/K rows
    interleaved for ``llama``, GPT-2 ``Conv1D`` weights transposed, each in ``quantization``
    (a GGML type name, or one per GGUF tensor kind such as ``{"attn_q": "Q4_1"}``; others F32).

    Returns ``path``. ``extra`` adds metadata ``{key: int | str}``.
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    size = head_dim or hidden // heads
    for hf_name, tensor in tensors.items():
        match = _LAYER.match(hf_name)
        if match is None or match.group(2) not in _GGUF_NAMES:
            continue
        kind = _GGUF_NAMES[match.group(2)]
        weight = tensor.detach().to(torch.float32).numpy()
        if architecture == "gpt2":
            weight = weight.T  # Conv1D [in, out] is stored as Linear [out, in]
        if architecture == "llama" and kind in ("attn_q", "attn_k"):
            weight = interleave_rotary(weight, size)
        weight = np.ascontiguousarray(weight)
        qtype_name = (
            quantization if isinstance(quantization, str) else quantization.get(kind, "F32")
        )
        qtype = gguf.GGMLQuantizationType[qtype_name]
        stored = weight if qtype_name == "F32" else gguf.quants.quantize(weight, qtype)
        writer.add_tensor(f"blk.{match.group(1)}.{kind}.weight", stored, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_NATIVE = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def native_tensors(tensors: Mapping[str, torch.Tensor], head_dim: int) -> dict[str, torch.Tensor]:
    """The layer tensors of ``tensors`` under Meta's and Mistral's native names, Q and K rows
    in the interleaved rotary order (the inverse of transformers' conversion script)."""
    native = {}
    for hf_name, tensor in tensors.items():
        match = _LAYER.match(hf_name)
        if match is None or match.group(2) not in _NATIVE:
            continue
        weight = tensor.detach().contiguous()
        if match.group(2) in ("self_attn.q_proj", "self_attn.k_proj"):
            permuted = interleave_rotary(weight.to(torch.float32).numpy(), head_dim)
            weight = torch.from_numpy(permuted).to(tensor.dtype)
        native[f"layers.{match.group(1)}.{_NATIVE[match.group(2)]}.weight"] = weight
    return native


def write_mistral_native(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    shape: LlamaShape,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A Mistral native directory: ``params.json`` and ``consolidated.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    params = {
        "dim": shape.hidden,
        "n_layers": shape.layers,
        "head_dim": shape.head_dim,
        "hidden_dim": shape.intermediate,
        "n_heads": shape.heads,
        "n_kv_heads": shape.kv_heads,
        "norm_eps": 1e-05,
        "vocab_size": shape.vocab,
        "rope_theta": 1000000.0,
    }
    (directory / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    native = {
        n: t.to(dtype).contiguous() for n, t in native_tensors(tensors, shape.head_dim).items()
    }
    save_file(native, str(directory / "consolidated.safetensors"))
    return directory
