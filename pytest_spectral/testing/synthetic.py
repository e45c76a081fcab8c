"""Small checkpoints in the Hugging Face layout, for tests, the demo and benchmarks.

The plugin never needs these; they exist so that everything can be exercised without a
network: ``config.json`` plus ``model.safetensors``, or shards listed in
``model.safetensors.index.json``, exactly as ``save_pretrained`` writes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama-layout model; ``head_dim * heads`` need not equal ``hidden``."""

    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    hidden: int = 64
    intermediate: int = 128
    vocab: int = 32
    model_type: str = "llama"
    mlp: bool = True

    def config(self, torch_dtype: str = "bfloat16") -> dict[str, object]:
        config: dict[str, object] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "torch_dtype": torch_dtype,
        }
        if self.head_dim * self.heads != self.hidden:
            config["head_dim"] = self.head_dim
        return config


def attention_name(layer: int, matrix: str) -> str:
    return f"model.layers.{layer}.self_attn.{matrix}_proj.weight"


def random_llama_weights(
    shape: LlamaShape, seed: int = 0, attention_only: bool = False
) -> dict[str, torch.Tensor]:
    """Gaussian float32 weights with the names and shapes of a Llama checkpoint."""
    generator = torch.Generator().manual_seed(seed)

    def gaussian(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / cols**0.5

    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    tensors: dict[str, torch.Tensor] = {}
    if not attention_only:
        tensors["model.embed_tokens.weight"] = gaussian(shape.vocab, shape.hidden)
    for layer in range(shape.layers):
        tensors[attention_name(layer, "q")] = gaussian(q_width, shape.hidden)
        tensors[attention_name(layer, "k")] = gaussian(kv_width, shape.hidden)
        tensors[attention_name(layer, "v")] = gaussian(kv_width, shape.hidden)
        tensors[attention_name(layer, "o")] = gaussian(shape.hidden, q_width)
        if attention_only or not shape.mlp:
            continue
        prefix = f"model.layers.{layer}.mlp"
        tensors[f"{prefix}.gate_proj.weight"] = gaussian(shape.intermediate, shape.hidden)
        tensors[f"{prefix}.up_proj.weight"] = gaussian(shape.intermediate, shape.hidden)
        tensors[f"{prefix}.down_proj.weight"] = gaussian(shape.hidden, shape.intermediate)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(shape.hidden)
    if not attention_only:
        tensors["model.norm.weight"] = torch.ones(shape.hidden)
        tensors["lm_head.weight"] = gaussian(shape.vocab, shape.hidden)
    return tensors


def conditioned_slices(
    count: int,
    rows: int,
    cols: int,
    kappas: tuple[float, float],
    generator: torch.Generator,
    *,
    frobenius: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``count`` slices (``dtype``) ``U diag(s) V^T`` of shape ``[rows, cols]`` (rows <= cols).

    ``U`` and ``V`` are Haar-random orthonormal factors, so ill-conditioning is spread over
    every weight (rotated, not graded: a row-scaled matrix would hide the errors of a Gram
    matrix). ``s`` is log-spaced from 1 down to ``1 / kappa``, with each slice's ``kappa``
    drawn log-uniformly from ``kappas``, then scaled to Frobenius norm ``frobenius``.
    Rounding to bf16 afterwards caps the measurable condition number (see the README).
    """
    low, high = np.log10(kappas[0]), np.log10(kappas[1])
    exponents = low + (high - low) * torch.rand(count, 1, generator=generator, dtype=torch.float64)
    spectrum = torch.pow(10.0, -exponents * torch.linspace(0, 1, rows, dtype=torch.float64))
    spectrum *= frobenius / spectrum.square().sum(-1, keepdim=True).sqrt()
    left = torch.linalg.qr(torch.randn(count, rows, rows, generator=generator, dtype=dtype)).Q
    right = torch.linalg.qr(torch.randn(count, cols, rows, generator=generator, dtype=dtype)).Q
    return (left * spectrum.to(dtype)[:, None, :]) @ right.mT


def trained_like_layer(
    shape: LlamaShape,
    layer: int,
    generator: torch.Generator,
    *,
    qk_kappas: tuple[float, float] = (10.0, 1e5),
    vo_kappas: tuple[float, float] = (2.0, 30.0),
) -> dict[str, torch.Tensor]:
    """One layer's float32 tensors with spectra shaped like a trained model's.

    Q and K heads get condition numbers spread over several decades (``qk_kappas``), V and O
    flatter ones (``vo_kappas``); each head has the Frobenius norm of a Gaussian init. The MLP
    (with ``shape.mlp``) is Gaussian.
    """
    d, hidden = shape.head_dim, shape.hidden
    norm = d**0.5  # a d x hidden Gaussian slice of variance 1 / hidden

    def heads(count: int, kappas: tuple[float, float]) -> torch.Tensor:
        return conditioned_slices(count, d, hidden, kappas, generator, frobenius=norm)

    tensors = {
        attention_name(layer, "q"): heads(shape.heads, qk_kappas).reshape(-1, hidden),
        attention_name(layer, "k"): heads(shape.kv_heads, qk_kappas).reshape(-1, hidden),
        attention_name(layer, "v"): heads(shape.kv_heads, vo_kappas).reshape(-1, hidden),
        # an O head is a column block [hidden, d]: the transpose of a [d, hidden] slice
        attention_name(layer, "o"): heads(shape.heads, vo_kappas)
        .permute(2, 0, 1)
        .reshape(hidden, -1),
    }
    if shape.mlp:
        prefix = f"model.layers.{layer}.mlp"
        scale = hidden**-0.5
        for name, rows, cols in (
            ("gate_proj", shape.intermediate, hidden),
            ("up_proj", shape.intermediate, hidden),
            ("down_proj", hidden, shape.intermediate),
        ):
            tensors[f"{prefix}.{name}.weight"] = (
                torch.randn(rows, cols, generator=generator) * scale
            )
    return tensors


def write_checkpoint(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, object],
    *,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
) -> Path:
    """Write ``tensors`` (cast to ``dtype``) and ``config`` as a checkpoint directory.

    With ``shards > 1`` tensors are split in name order into ``model-0000i-of-0000N``
    files and listed in ``model.safetensors.index.json``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    cast = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    if shards == 1:
        save_file(cast, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = list(cast)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for number in range(shards):
        part = names[number * per_shard : (number + 1) * per_shard]
        filename = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: cast[n] for n in part}, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in cast.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


def write_random_llama(
    directory: Path,
    shape: LlamaShape = LlamaShape(),
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    attention_only: bool = False,
) -> Path:
    """A random Llama-layout checkpoint in one call."""
    tensors = random_llama_weights(shape, seed, attention_only)
    dtype_name = str(dtype).removeprefix("torch.")
    return write_checkpoint(
        directory, tensors, shape.config(dtype_name), dtype=dtype, shards=shards
    )
