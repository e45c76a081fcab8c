"""Checkpoint formats: each turns a path into a config and tensors in Hugging Face terms.

:func:`open_format` recognises what a path holds; see :mod:`.base` for what a format gives.
One module per format; nothing outside this package knows which one a checkpoint came in.
A format's module is imported only when a path is recognised as that format (or must be
looked at by its recogniser), so a run of a Hugging Face directory never loads the GGUF,
LoRA, DCP or training-checkpoint readers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.checkpoints.formats.base import Format
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import UntrustedFileError, check_regular

#: the file that makes a directory a PEFT LoRA adapter (see :mod:`.lora`)
ADAPTER_CONFIG = "adapter_config.json"

__all__ = ["ADAPTER_CONFIG", "Format", "ReadOptions", "is_adapter", "open_format"]


@dataclass(frozen=True)
class ReadOptions:
    """What the command line adds to a checkpoint's own files."""

    #: ``--spectral-config``: a config.json that wins over what the checkpoint carries
    config: Path | None = None
    #: ``--spectral-base-model``, resolved to a local path: the model a LoRA adapter adapts
    base_model: Path | None = None
    #: ``--spectral-adapter``: analyse a LoRA adapter's ``merged`` weights or its ``delta``
    adapter: str = "merged"


def is_adapter(directory: Path) -> bool:
    """Whether ``directory`` holds a LoRA adapter (its ``adapter_config.json``)."""
    return os.path.lexists(directory / ADAPTER_CONFIG)


def open_format(path: Path, options: ReadOptions = ReadOptions()) -> Format:
    """The format of the checkpoint at ``path`` (a directory or a single file), unopened but
    for what recognising it needs. Raises :class:`CheckpointError` saying what the path is."""
    if path.is_dir():
        return _directory_format(path, options)
    try:
        check_regular(path)
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    from pytest_spectral.checkpoints.formats.gguf_file import GgufFile, is_gguf

    if is_gguf(path):
        return GgufFile(path)
    if path.suffix != ".safetensors":
        from pytest_spectral.checkpoints.formats.training import TorchCheckpoint

        return TorchCheckpoint(path)
    from pytest_spectral.checkpoints.formats.huggingface import WeightFileWithConfig

    return WeightFileWithConfig(path)


def _directory_format(path: Path, options: ReadOptions) -> Format:
    """Hugging Face files win: a repository holding them and Mistral's native files is read
    once, through its index."""
    from pytest_spectral.checkpoints.formats.huggingface import HuggingFaceDirectory, has_weights

    if has_weights(path):
        return HuggingFaceDirectory(path)
    if is_adapter(path):
        from pytest_spectral.checkpoints.formats.lora import LoraAdapter

        return LoraAdapter(path, mode=options.adapter, base=_base_model(path, options))
    from pytest_spectral.checkpoints.formats.mistral import MistralDirectory, is_native

    if is_native(path):
        return MistralDirectory(path)
    from pytest_spectral.checkpoints.formats.dcp import DistributedCheckpoint, is_distributed

    if is_distributed(path):
        return DistributedCheckpoint(path)
    return HuggingFaceDirectory(path)  # its error lists what the directory holds


def _base_model(adapter: Path, options: ReadOptions) -> Format | None:
    """The model a LoRA adapter adapts: ``--spectral-base-model``, else the adapter config's
    ``base_model_name_or_path`` if it is a hub id already in the local hub cache (a local path
    there is not followed: the adapter could name any file on the machine)."""
    from pytest_spectral.checkpoints.formats.lora import LoraSettings
    from pytest_spectral.checkpoints.hub import HUB_SCHEME, cached_snapshot, hub_id_of

    if options.base_model is not None:
        return open_format(options.base_model)
    named = LoraSettings.read(adapter / ADAPTER_CONFIG).base_model
    if named is None or named.startswith(HUB_SCHEME) or hub_id_of(named) != named:
        return None
    snapshot = cached_snapshot(named)
    return open_format(snapshot) if snapshot is not None else None
