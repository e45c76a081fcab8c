"""Weight files named by a checkpoint's own files: confined to the checkpoint, parsed once.

An index (``model.safetensors.index.json``), a distributed checkpoint's ``.metadata`` or a
Mistral directory names the files that hold the tensors. Those names come from the checkpoint
and are not trusted: each must be a relative path that stays inside the checkpoint directory
and resolves (symlinks followed) to a regular file there, or, for a Hugging Face cache
snapshot, in its repository's ``blobs/``. Each physical file is parsed once however many
spellings (``x``, ``./x``, hard and symbolic links) name it, and all headers together are
capped at :data:`MAX_TOTAL_HEADER_BYTES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pytest_spectral.checkpoints.formats.safetensors import MAX_HEADER_BYTES, WeightFile
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import MiB, UntrustedFileError, check_regular

#: All weight-file headers of one checkpoint together (safetensors JSON, torch.save pickles,
#: GGUF metadata). About 120 bytes per tensor: the largest mixtures of experts (a trillion
#: parameters, 140,000 tensors) have under 20 MB; parsing 32 MiB of hostile headers takes a
#: few seconds.
MAX_TOTAL_HEADER_BYTES = 32 * MiB

File = TypeVar("File", bound=WeightFile)


class HeaderBudget:
    """What is left of :data:`MAX_TOTAL_HEADER_BYTES` for one checkpoint; each physical file
    is read once, under any name."""

    def __init__(self, total: int = MAX_TOTAL_HEADER_BYTES) -> None:
        self.left = total
        self._by_name: dict[str, WeightFile] = {}
        self._by_identity: dict[tuple[int, int], WeightFile] = {}

    def read(
        self, path: Path, reader: Callable[[Path, int, Callable[[str], bool]], File],
        wanted: Callable[[str], bool],
    ) -> File:  # fmt: skip
        """``reader(path, limit, wanted)``, or what it gave for the same file before."""
        known = self._by_name.get(str(path))
        if known is None:
            identity = file_key(path)
            known = self._by_identity.get(identity)
            if known is None:
                known = reader(path, min(self.left, MAX_HEADER_BYTES), wanted)
                self.left -= known.header_bytes
                self._by_identity[identity] = known
            self._by_name[str(path)] = known
        return known  # type: ignore[return-value]


def file_key(path: Path) -> tuple[int, int]:
    """Device and inode: the same physical file under any name or link."""
    try:
        status = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return status.st_dev, status.st_ino


def named_file(listing: Path, name: object, what: str) -> Path:
    """The file ``name`` that ``listing`` (an index, a metadata file) names, refused unless it
    is a regular file inside the checkpoint; ``what`` says what needs it, for messages."""
    where = f"{listing}: shard {name!r} ({what})"
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{where} is not a file name")
    if os.path.isabs(name):
        raise CheckpointError(f"{where} is an absolute path; shards must lie in the checkpoint")
    normal = os.path.normpath(name)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise CheckpointError(f"{where} leaves the checkpoint directory ('..'); refused")
    path = listing.parent / normal
    check_inside(listing.parent, path, where)
    return path


def check_inside(root: Path, path: Path, where: str) -> None:
    """Refuse a weight file that is not a regular file, or whose real location (symlinks
    resolved) is outside ``root``; ``where`` starts the message.

    A Hugging Face cache snapshot holds symlinks into its repository's ``blobs/`` folder:
    exactly that folder is allowed too.
    """
    try:
        check_regular(path)
    except UntrustedFileError as exc:
        raise CheckpointError(f"{where}: {str(exc).removeprefix(f'{path}: ')}") from None
    real = os.path.realpath(path)
    allowed = [os.path.realpath(root)]
    allowed.extend(hub_blobs(Path(allowed[0])))
    if not any(os.path.commonpath([real, place]) == place for place in allowed):
        raise CheckpointError(
            f"{where}: resolves to {real}, outside the checkpoint directory; refused (copy the "
            "file into the checkpoint, or pass a single weight file itself as --spectral-model)"
        )


def hub_blobs(root: Path) -> list[str]:
    """The ``blobs/`` folder of the hub cache repository ``root`` is a snapshot of, if any."""
    for folder in (root, *root.parents):
        parent = folder.parent
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            return [str(parent.parent / "blobs")]
    return []
