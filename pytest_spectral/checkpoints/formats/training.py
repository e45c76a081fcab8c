"""Checkpoints written by training code: one ``torch.save`` file holding a state dict.

What a CI gate meets after a training job: a bare state dict (``torch.save(model.state_dict())``)
or a framework's checkpoint with the state dict under a key (PyTorch Lightning's
``state_dict``, DeepSpeed's ``module``, nanoGPT's ``model``; see
:data:`~.torch_file.STATE_DICT_KEYS`) and names under the framework's prefixes (``model.``,
``module.``, ``_orig_mod.`` from ``torch.compile``), which the family's prefix search takes in its
stride. Everything is read through the restricted unpickler of :mod:`.torch_file`.

The config comes from ``--spectral-config``, else from what the checkpoint carries (nanoGPT's
``model_args``, a Lightning ``hyper_parameters`` entry holding a transformers config), else from
``config.json`` beside the file.

nanoGPT's model is GPT-2 built from ``nn.Linear`` (out x in) where transformers' GPT-2 has
``Conv1D`` (in x out): its ``c_attn``, ``c_proj`` and ``c_fc`` weights are transposed to the
transformers layout they are named after (as nanoGPT's own ``from_pretrained`` does the other
way round).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from pytest_spectral.checkpoints.formats.base import Format, TensorMap, read_config
from pytest_spectral.checkpoints.formats.meta_names import with_transformers_names
from pytest_spectral.checkpoints.formats.shards import MAX_TOTAL_HEADER_BYTES
from pytest_spectral.checkpoints.formats.sources import TensorSource, Transposed
from pytest_spectral.checkpoints.formats.torch_file import TorchFile, read_torch_file
from pytest_spectral.errors import CheckpointError

#: nanoGPT's Linear weights that transformers' GPT-2 stores as Conv1D
_NANOGPT_LINEAR = re.compile(r"\.(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
#: nanoGPT's model_args -> transformers' GPT2Config names
_NANOGPT_CONFIG = {
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "vocab_size": "vocab_size",
    "block_size": "n_positions",
}


class TorchCheckpoint(Format):
    """A single ``torch.save`` file: a state dict, bare or inside a training checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path.parent
        self._file: TorchFile | None = None

    @property
    def file(self) -> TorchFile:
        if self._file is None:
            self._file = read_torch_file(self.path, MAX_TOTAL_HEADER_BYTES)
        return self._file

    @property
    def is_nanogpt(self) -> bool:
        root = self.file.root
        return (
            self.file.container == "model"
            and isinstance(root, dict)
            and isinstance(root.get("model_args"), dict)
        )

    def config(self) -> tuple[dict[str, object], Path]:
        carried = self.carried_config()
        if carried is not None:
            return carried, self.path
        beside = self.root / "config.json"
        if not os.path.lexists(beside):
            raise CheckpointError(
                f"{self.path}: carries no config (no nanoGPT model_args, no Lightning "
                "hyper_parameters with a model_type) and has no config.json beside it; give the "
                "model's config.json with --spectral-config"
            )
        return read_config(beside), beside

    def carried_config(self) -> dict[str, object] | None:
        """The config the checkpoint holds, in transformers' terms, if it holds one."""
        root = self.file.root
        if not isinstance(root, dict):
            return None
        if self.is_nanogpt:
            arguments = root["model_args"]
            config: dict[str, object] = {"model_type": "gpt2"}
            config.update(
                {name: arguments[key] for key, name in _NANOGPT_CONFIG.items() if key in arguments}
            )
            return config
        hyper = root.get("hyper_parameters")
        if isinstance(hyper, dict):
            for candidate in (hyper, *hyper.values()):
                if isinstance(candidate, dict) and isinstance(candidate.get("model_type"), str):
                    return _plain(candidate)
        return None

    def tensors(self, wanted: Callable[[str], bool], head_dim: int) -> TensorMap:
        found: dict[str, TensorSource] = dict(self.file.all_entries)
        if self.is_nanogpt:
            found = {
                name: Transposed(source) if _NANOGPT_LINEAR.search(name) else source
                for name, source in found.items()
            }
        named = with_transformers_names(found, head_dim)
        return {name: source for name, source in named.items() if wanted(name)}


def _plain(config: Mapping[object, object], *, nested: bool = True) -> dict[str, object]:
    """The config's top-level plain values (numbers, strings, booleans), and those of its
    text_config (one level: a pickle can make a dict that contains itself)."""
    plain: dict[str, object] = {}
    for key, value in config.items():
        if not isinstance(key, str):
            continue
        if value is None or isinstance(value, int | float | str):
            plain[key] = value
        elif nested and key == "text_config" and isinstance(value, dict):
            plain[key] = _plain(value, nested=False)
    return plain
