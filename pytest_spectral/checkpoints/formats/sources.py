"""Tensor sources: how one weight, under its Hugging Face name, is produced from the files.

A format module turns a checkpoint into a config in Hugging Face terms and a map from Hugging
Face tensor names to *sources*; the families, the engine and the cache see only sources. A
source says how to produce the tensor (raw bytes at an offset of a file collected and verified,
dequantized GGUF blocks, a LoRA merge of several tensors, chunks of a distributed checkpoint,
rows reordered from another convention), what the cache key needs (the identity of every file
it reads, and samples of their bytes), and names the tensor and file *as stored* for messages.

Nothing here trusts the files: every read goes through
:func:`pytest_spectral.untrusted.read_verified` (plain reads from the file as collected, never a
memory map), and a source that cannot be produced says why in :attr:`problem` before anything
is read, so that only tensors a run reads can refuse it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pytest_spectral.untrusted import FileIdentity, read_verified

if TYPE_CHECKING:
    import torch

#: Bytes per element of the dtypes whose spectra can be computed directly.
DTYPE_SIZES: dict[str, int] = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
#: Bytes per element of every dtype whose storage can be checked against a header's claims
#: (safetensors names); tensors of other dtypes are accepted unchecked and never read.
ELEMENT_SIZES: dict[str, float] = {
    **DTYPE_SIZES,
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    "C64": 8,
    "C128": 16,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}


class TensorSource(Protocol):
    """One tensor as a run reads it, in the orientation its Hugging Face name implies."""

    #: the tensor's name as stored (messages), e.g. ``blk.3.attn_q.weight`` in a GGUF file
    name: str
    #: the file holding it (messages); the first of several for composite sources
    file: Path
    #: storage dtype as stored: ``BF16``, ``F32``, ``Q4_1``...
    dtype: str
    shape: tuple[int, ...]

    @property
    def problem(self) -> str:
        """Why the tensor cannot be produced ("" when it can), said after its name."""
        ...

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file it reads."""
        ...

    @property
    def key(self) -> object:
        """Identifies the tensor among a run's sources (the reader holds tensors by it)."""
        ...

    def cache_material(self) -> list[object]:
        """JSON-able description for the cache key: the identity and header of every file
        read, where the bytes are, how they are transformed, and a digest of samples of
        the bytes. Raises :class:`~pytest_spectral.untrusted.FileChangedError`."""
        ...

    def load(self) -> torch.Tensor:
        """The tensor, in a buffer of its own. Raises
        :class:`~pytest_spectral.untrusted.FileChangedError` when a file changed."""
        ...


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """A tensor stored as plain bytes: safetensors, ``torch.save`` records, GGUF F32/F16."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    #: absolute byte offset of the first element in ``file``
    offset: int
    nbytes: int
    #: SHA-256 of the file's whole header (its pickle for torch.save files): changes when any
    #: tensor moves or is added
    header_sha256: str
    #: the file as collected; reads verify it is still the same
    identity: FileIdentity
    #: why the tensor cannot be read although its file is sound ("" when it can be)
    reason: str = ""

    @property
    def problem(self) -> str:
        if self.reason:
            return self.reason
        if self.dtype not in DTYPE_SIZES:
            return (
                f"has dtype {self.dtype}; only {', '.join(DTYPE_SIZES)} weights can be "
                "analysed (dequantize first)"
            )
        return ""

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.file,)

    @property
    def key(self) -> object:
        return (self.file, self.offset)

    def cache_material(self) -> list[object]:
        identity = self.identity
        return [
            "stored",
            str(self.file.resolve()),
            [identity.device, identity.inode, identity.size, identity.mtime_ns, identity.ctime_ns],
            self.header_sha256,
            [self.name, self.dtype, list(self.shape), self.offset, self.nbytes],
            hashlib.blake2b(self.sample_bytes(), digest_size=16).hexdigest(),
        ]

    def sample_bytes(self, blocks: int = 16, block_bytes: int = 4096) -> bytes:
        """Evenly spaced pieces of the tensor's bytes (and its last 4 KiB): a cheap content
        check for the cache key. Plain verified reads: neither torch nor the whole tensor."""
        stride = max(1, self.nbytes // blocks)
        starts = [i * stride for i in range(blocks)]
        starts.append(max(0, self.nbytes - block_bytes))
        buffers = [bytearray(max(0, min(block_bytes, self.nbytes - start))) for start in starts]
        read_verified(
            self.file,
            self.identity,
            [(self.offset + s, memoryview(b)) for s, b in zip(starts, buffers, strict=True)],
        )
        return b"".join(buffers)

    def raw(self) -> torch.Tensor:
        """The bytes, verified, in a fresh ``uint8`` buffer."""
        import torch

        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        read_verified(self.file, self.identity, [(self.offset, memoryview(buffer.numpy()))])
        return buffer

    def load(self) -> torch.Tensor:
        from pytest_spectral.checkpoints.reader import TORCH_DTYPES

        return self.raw().view(TORCH_DTYPES[self.dtype]).view(self.shape)


@dataclass(frozen=True)
class UnreadableTensor:
    """A tensor the checkpoint promises but cannot deliver (a shard lacking a tensor its index
    lists): harmless until a run reads it, then a usage error naming it."""

    file: Path
    name: str
    reason: str
    dtype: str = "?"
    shape: tuple[int, ...] = ()

    @property
    def problem(self) -> str:
        return self.reason

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.file,)

    @property
    def key(self) -> object:
        return ("unreadable", self.file, self.name)

    def cache_material(self) -> list[object]:
        raise ValueError(f"{self.file}: tensor {self.name!r} {self.reason}")

    def load(self) -> torch.Tensor:
        raise ValueError(f"{self.file}: tensor {self.name!r} {self.reason}")


class _Reordered:
    """A source that produces another source's tensor with its elements moved: it names,
    locates and types the tensor as the inner source does."""

    inner: TensorSource

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def file(self) -> Path:
        return self.inner.file

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    @property
    def files(self) -> tuple[Path, ...]:
        return self.inner.files


@dataclass(frozen=True)
class RotaryHalves(_Reordered):
    """Q or K rows stored in the interleaved rotary order of Meta's and Mistral's reference
    code (and llama.cpp's GGUF files), reordered to the half-split order transformers uses.

    Within each head of ``head_dim`` rows, stored row ``2i + j`` (pair ``i``, member ``j``) is
    transformers' row ``j * head_dim / 2 + i``: the inverse of ``permute`` in llama.cpp's
    ``convert_hf_to_gguf.py``, the same reshaping as ``permute_for_rope`` in transformers'
    ``convert_mistral_weights_to_hf.py`` and ``_reverse_permute_weights`` in its GGUF loader.
    Rows move only within their head, so each head's slice holds its true rows.
    """

    inner: TensorSource
    head_dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape

    @property
    def problem(self) -> str:
        if self.inner.problem:
            return self.inner.problem
        rows = self.inner.shape[0] if len(self.inner.shape) == 2 else 0
        if self.head_dim % 2 or not rows or rows % self.head_dim:
            return (
                f"has shape {list(self.inner.shape)}: its rotary rows cannot be reordered in "
                f"heads of {self.head_dim} (head_dim must be even and divide the rows)"
            )
        return ""

    @property
    def key(self) -> object:
        return ("rotary", self.inner.key)

    def cache_material(self) -> list[object]:
        return ["rotary-halves", self.head_dim, self.inner.cache_material()]

    def load(self) -> torch.Tensor:
        weight = self.inner.load()
        rows, columns = weight.shape
        pairs = weight.view(rows // self.head_dim, self.head_dim // 2, 2, columns)
        return pairs.transpose(1, 2).reshape(rows, columns)


@dataclass(frozen=True)
class Transposed(_Reordered):
    """A 2-D tensor stored the other way round from its Hugging Face name (``nn.Linear`` in
    nanoGPT where transformers' GPT-2 has ``Conv1D``; ``Conv1D`` weights GGUF stores as
    ``Linear``), materialised contiguous so heads can be viewed as blocks."""

    inner: TensorSource

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.inner.shape))

    @property
    def problem(self) -> str:
        if self.inner.problem:
            return self.inner.problem
        if len(self.inner.shape) != 2:
            return f"has shape {list(self.inner.shape)}; a 2-D weight was expected"
        return ""

    @property
    def key(self) -> object:
        return ("transposed", self.inner.key)

    def cache_material(self) -> list[object]:
        return ["transposed", self.inner.cache_material()]

    def load(self) -> torch.Tensor:
        return self.inner.load().T.contiguous()


@dataclass(frozen=True)
class Chunk:
    """One piece of a tensor split across files or ranks: where it sits, and its source."""

    offsets: tuple[int, ...]
    source: TensorSource


@dataclass(frozen=True)
class Assembled:
    """A tensor saved in chunks (``torch.distributed.checkpoint`` from several ranks), put
    back together; the chunks were checked at collection to tile the tensor exactly."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Sequence[Chunk]
    reason: str = ""

    @property
    def file(self) -> Path:
        return self.chunks[0].source.file

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(f for c in self.chunks for f in c.source.files))

    @property
    def problem(self) -> str:
        return self.reason or next((c.source.problem for c in self.chunks if c.source.problem), "")

    @property
    def key(self) -> object:
        return ("assembled", tuple(c.source.key for c in self.chunks))

    def cache_material(self) -> list[object]:
        return [
            "assembled",
            list(self.shape),
            [[list(c.offsets), c.source.cache_material()] for c in self.chunks],
        ]

    def load(self) -> torch.Tensor:
        """The chunks copied into place; raises ``ValueError`` unless they cover the tensor
        exactly once (their sizes were checked to add up, so an overlap leaves a gap)."""
        import torch

        whole: torch.Tensor | None = None
        covered = torch.zeros(self.shape, dtype=torch.uint8)
        for chunk in self.chunks:
            part = chunk.source.load()
            if whole is None:
                whole = torch.empty(self.shape, dtype=part.dtype)
            region, seen = whole, covered
            for axis, (start, size) in enumerate(zip(chunk.offsets, part.shape, strict=True)):
                region, seen = region.narrow(axis, start, size), seen.narrow(axis, start, size)
            region.copy_(part)
            seen += 1
        if whole is None or not bool((covered == 1).all()):
            raise ValueError(f"the chunks of {self.name} overlap and leave part of it unwritten")
        return whole
