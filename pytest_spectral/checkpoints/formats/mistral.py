"""Mistral's (and Meta's) native layout: ``params.json`` with ``consolidated`` weights.

``params.json`` holds the geometry under the reference code's names (``dim``, ``n_layers``,
``n_heads``, ``n_kv_heads``, ``head_dim``, ``hidden_dim``); the weights are in
``consolidated.safetensors`` (Mistral; or shards listed in ``consolidated.safetensors.index.json``)
or ``consolidated.00.pth`` (Meta's ``original/`` folders), under native names with Q and K rows
in the interleaved rotary order (see :mod:`.meta_names`). The config is translated as
transformers' ``convert_mistral_weights_to_hf.py`` does (``convert_config``).

A directory holding Hugging Face weights as well is read as a Hugging Face checkpoint: this
layout is chosen only when there are none, so its files are never read twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pytest_spectral.checkpoints.formats.base import Format, TensorMap, read_config
from pytest_spectral.checkpoints.formats.huggingface import read_weight_file, sharded_tensors
from pytest_spectral.checkpoints.formats.meta_names import native_or, with_transformers_names
from pytest_spectral.checkpoints.formats.safetensors import read_header
from pytest_spectral.checkpoints.formats.shards import HeaderBudget, check_inside
from pytest_spectral.errors import CheckpointError

PARAMS_FILE = "params.json"
#: The weight files of this layout, in the order they are looked for.
CONSOLIDATED_FILES = (
    "consolidated.safetensors.index.json",
    "consolidated.safetensors",
    "consolidated.00.pth",
)
#: params.json key -> config.json key (transformers' convert_config), and whether required
_CONFIG_KEYS = {
    "dim": ("hidden_size", True),
    "n_layers": ("num_hidden_layers", True),
    "n_heads": ("num_attention_heads", True),
    "n_kv_heads": ("num_key_value_heads", False),
    "head_dim": ("head_dim", False),
    "hidden_dim": ("intermediate_size", False),
    "vocab_size": ("vocab_size", False),
}


def params_config(path: Path, model_type: str) -> dict[str, object]:
    """The config ``params.json`` describes, in transformers' terms (``mixtral`` for a mixture
    of experts, else ``model_type``); errors name the native key."""
    params = read_config(path, "params.json")
    kind = "mixtral" if params.get("moe") is not None else model_type
    config: dict[str, object] = {"model_type": kind}
    for key, (name, required) in _CONFIG_KEYS.items():
        value = params.get(key)
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key!r} must be a positive integer, got {value!r:.40}")
        config[name] = value
    return config


def is_native(directory: Path) -> bool:
    return os.path.lexists(directory / PARAMS_FILE) and any(
        os.path.lexists(directory / name) for name in CONSOLIDATED_FILES
    )


class MistralDirectory(Format):
    """``params.json`` and ``consolidated`` weights under native names."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.weights = next(
            root / name for name in CONSOLIDATED_FILES if os.path.lexists(root / name)
        )

    def config(self) -> tuple[dict[str, object], Path]:
        meta = self.weights.suffix == ".pth"  # Meta's original/ folders are Llama's
        path = self.root / PARAMS_FILE
        return params_config(path, "llama" if meta else "mistral"), path

    def tensors(self, wanted: Callable[[str], bool], head_dim: int) -> TensorMap:
        accepts = native_or(wanted)
        if self.weights.name.endswith(".index.json"):
            found = sharded_tensors(self.weights, read_header, accepts, HeaderBudget())
        else:
            check_inside(self.root, self.weights, str(self.weights))
            found = dict(read_weight_file(self.weights, accepts).entries)
        return with_transformers_names(found, head_dim)
