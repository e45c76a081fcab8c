"""What every checkpoint format gives the rest of the plugin.

A format turns a path into two things, both in Hugging Face terms: a config (the keys of a
``config.json``), and a map from Hugging Face tensor names (``model.layers.0.self_attn.q_proj
.weight``) to :mod:`tensor sources <pytest_spectral.checkpoints.formats.sources>`. Families,
which know only those names and keys, never learn which format a checkpoint came in; a
source's messages still name the tensor and file as stored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from pytest_spectral.checkpoints.formats.sources import TensorSource
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import (
    MAX_CONFIG_BYTES,
    MissingFileError,
    UntrustedFileError,
    load_json,
)

TensorMap = Mapping[str, TensorSource]


class Format:
    """One checkpoint as found on disk (subclasses: one per layout)."""

    #: the directory the checkpoint lives in: reports name files relative to it, and nothing
    #: may be written inside it
    root: Path
    #: True when a checkpoint may lack some attention matrices altogether (a LoRA update
    #: adapts only the modules it targets); otherwise each of Q, K, V and O must be present
    partial: bool = False
    #: the name prefix of the text model's layers among some tensor names (the reader sets it
    #: once it knows the architecture; raises :class:`CheckpointError` when none is found): a
    #: LoRA adapter matches its modules with the base model's weights by it when the two name
    #: a multimodal wrapper's text model differently
    text_prefix: Callable[[TensorMap], str] | None = None

    def config(self) -> tuple[dict[str, object], Path]:
        """The config in Hugging Face terms, and the file it comes from (for messages).

        Raises :class:`CheckpointError` naming the file and what to do.
        """
        raise NotImplementedError

    def tensors(self, wanted: Callable[[str], bool], head_dim: int) -> TensorMap:
        """The tensors whose Hugging Face names ``wanted`` accepts (others may be left out).

        ``head_dim`` is the config's head size, for formats that store Q and K rows in another
        order than transformers. Raises :class:`CheckpointError`.
        """
        raise NotImplementedError


def read_config(path: Path, what: str = "config") -> dict[str, object]:
    """A JSON object from ``path`` (capped at 4 MiB, nesting checked)."""
    try:
        config = load_json(path, MAX_CONFIG_BYTES, what)
    except MissingFileError:
        raise CheckpointError(
            f"{path}: missing; a Hugging Face checkpoint directory needs its config.json "
            "(for a single weight file elsewhere, give --spectral-config)"
        ) from None
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config
