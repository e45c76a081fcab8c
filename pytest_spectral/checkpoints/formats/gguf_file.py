"""GGUF files (llama.cpp, Ollama): metadata as a Hugging Face config, tensors dequantized.

Reading goes through the format's own library, ``gguf`` (the ``gguf`` extra), for everything
it defines: value and tensor type codes, block sizes, metadata key names, llama.cpp's tensor
names, and the dequantization of every type it implements (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x,
the K-quants, the IQ types...). Its ``GGUFReader`` is not used: it memory-maps the whole file
(a file truncated under the run would be a ``SIGBUS`` that kills the interpreter) and walks
whatever counts and lengths the header claims (an array of 10^12 strings is a loop of 10^12
steps). Instead, the header is parsed here from one plain read of at most
:data:`MAX_GGUF_HEADER_BYTES`, every count and length checked against the bytes that remain
before it is used, and each tensor's blocks are read like any other weight (``pread`` from the
file as collected) and dequantized with ``gguf.quants.dequantize``, a few rows at a time.

llama.cpp's storage conventions, undone so that each head slice is the head's true rows
exactly as transformers loads them (checked against transformers' own GGUF loader in the tests):

* dimensions are listed fastest first (``ne[0]`` is the number of columns), so a ``[4096,
  1024]`` GGUF tensor is ``1024 x 4096`` in ``nn.Linear``'s (out, in) orientation;
* for the ``llama`` architecture, ``convert_hf_to_gguf.py`` permutes the rows of Q and K within
  each head to the interleaved rotary order of Meta's code (``LlamaModel.permute``); they are
  put back in transformers' half-split order (:class:`~.sources.RotaryHalves`);
* GPT-2's ``Conv1D`` weights are stored transposed, as ``nn.Linear`` ones; they are turned back.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_spectral.checkpoints.formats.base import Format, TensorMap
from pytest_spectral.checkpoints.formats.safetensors import check_no_overlap
from pytest_spectral.checkpoints.formats.sources import (
    RotaryHalves,
    StoredTensor,
    TensorSource,
    Transposed,
)
from pytest_spectral.errors import CheckpointError
from pytest_spectral.untrusted import (
    FileIdentity,
    MiB,
    UntrustedFileError,
    open_regular,
    read_at,
)

if TYPE_CHECKING:
    import torch

#: Metadata and tensor descriptions together. Real files hold their tokenizer there (a
#: 260,000-token vocabulary with scores and merges is under 15 MB); walking 32 MiB of hostile
#: metadata takes a few seconds.
MAX_GGUF_HEADER_BYTES = 32 * MiB
#: Numeric metadata arrays longer than this are skipped unread (per-layer values are short).
MAX_KEPT_ARRAY = 4096
#: Longest metadata key or tensor name accepted (llama.cpp allows 64-byte tensor names).
MAX_NAME_BYTES = 4096
#: ``GGML_MAX_DIMS``.
MAX_DIMS = 4
INSTALL = "pip install 'pytest-spectral[gguf]'"
#: Plain types read as stored, by their GGML type name.
_PLAIN_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64"}


def gguf_module():  # the optional dependency, typed as a module
    """The ``gguf`` package, or a usage error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            f"reading GGUF files needs the gguf package (llama.cpp's gguf-py): {INSTALL}"
        ) from None
    return gguf


def is_gguf(path: Path) -> bool:
    """Whether ``path`` starts with the GGUF magic (or is named ``*.gguf``)."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open_regular(path) as (descriptor, _):
            return read_at(descriptor, 0, 4) == b"GGUF"
    except (UntrustedFileError, OSError):
        return False


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp stores one architecture, and its names in transformers."""

    model_type: str
    #: GGUF tensor kind (``gguf.MODEL_TENSOR`` member name) -> transformers name with {bid}
    tensors: Mapping[str, str]
    #: Q and K rows in llama.cpp's permuted (interleaved rotary) order
    rotary_interleaved: bool = False
    #: tensor kinds stored transposed relative to transformers (Conv1D stored as Linear)
    transposed: frozenset[str] = frozenset()
    #: GGUF keys (after ``{arch}.``) that give head_dim, first present wins; none: hidden / heads
    head_dim_keys: tuple[str, ...] = ()
    #: config.json names for layers, heads, hidden size and K/V heads
    config_names: tuple[str, str, str, str] = (
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_size",
        "num_key_value_heads",
    )


def _llama_like(**changes: object) -> dict[str, object]:
    layer = "model.layers.{bid}."
    names = {
        "ATTN_Q": layer + "self_attn.q_proj.weight",
        "ATTN_K": layer + "self_attn.k_proj.weight",
        "ATTN_V": layer + "self_attn.v_proj.weight",
        "ATTN_OUT": layer + "self_attn.o_proj.weight",
        "FFN_GATE": layer + "mlp.gate_proj.weight",
        "FFN_UP": layer + "mlp.up_proj.weight",
        "FFN_DOWN": layer + "mlp.down_proj.weight",
    }
    return {"tensors": names, **changes}


_GPT2_LAYER = "transformer.h.{bid}."
#: GGUF ``general.architecture`` -> how its tensors map to transformers'. Each entry is checked
#: in the tests against ``gguf.get_tensor_name_map`` and against transformers' GGUF loader.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        "llama",
        **_llama_like(rotary_interleaved=True, head_dim_keys=("key_length", "dimension_count")),
    ),
    "qwen2": Architecture("qwen2", **_llama_like()),
    "qwen3": Architecture("qwen3", **_llama_like(head_dim_keys=("key_length",))),
    "gemma": Architecture("gemma", **_llama_like(head_dim_keys=("key_length",))),
    "gemma2": Architecture("gemma2", **_llama_like(head_dim_keys=("key_length",))),
    "phi3": Architecture(
        "phi3",
        {
            "ATTN_QKV": "model.layers.{bid}.self_attn.qkv_proj.weight",
            "ATTN_OUT": "model.layers.{bid}.self_attn.o_proj.weight",
            "FFN_UP": "model.layers.{bid}.mlp.gate_up_proj.weight",
            "FFN_DOWN": "model.layers.{bid}.mlp.down_proj.weight",
        },
    ),
    "gpt2": Architecture(
        "gpt2",
        {
            "ATTN_QKV": _GPT2_LAYER + "attn.c_attn.weight",
            "ATTN_OUT": _GPT2_LAYER + "attn.c_proj.weight",
            "FFN_UP": _GPT2_LAYER + "mlp.c_fc.weight",
            "FFN_DOWN": _GPT2_LAYER + "mlp.c_proj.weight",
        },
        transposed=frozenset({"ATTN_QKV", "ATTN_OUT", "FFN_UP", "FFN_DOWN"}),
        config_names=("n_layer", "n_head", "n_embd", "n_head_kv"),
    ),
}
#: GGUF metadata key suffixes (after ``{arch}.``) -> what they become in the config
_BLOCK_COUNT, _EMBEDDING, _HEADS, _KV_HEADS = (
    "block_count",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
)
_HEAD_DIM_KEYS = {"key_length": "attention.key_length", "dimension_count": "rope.dimension_count"}


#: (GGML type code, numpy-order shape, absolute offset, byte count or None if unknown)
Placement = tuple[int, tuple[int, ...], int, int | None]


@dataclass
class GgufHeader:
    """What the header of a GGUF file says: metadata values and where each tensor lies."""

    path: Path
    identity: FileIdentity
    version: int
    metadata: dict[str, object]
    #: name -> (GGML type code, numpy-order shape, absolute offset, byte count or None)
    tensors: dict[str, Placement] = field(default_factory=dict)
    header_sha256: str = ""


class GgufFile(Format):
    """A ``.gguf`` file: a config from its metadata, tensors dequantized on read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path.parent
        self._header: GgufHeader | None = None

    @property
    def header(self) -> GgufHeader:
        if self._header is None:
            self._header = read_gguf_header(self.path)
        return self._header

    @property
    def architecture(self) -> tuple[str, Architecture]:
        name = self.header.metadata.get("general.architecture")
        if not isinstance(name, str):
            raise CheckpointError(f"{self.path}: no general.architecture string in its metadata")
        known = ARCHITECTURES.get(name)
        if known is None:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {name!r:.60} is not supported; supported: "
                f"{', '.join(ARCHITECTURES)} (or convert the model to safetensors)"
            )
        return name, known

    def config(self) -> tuple[dict[str, object], Path]:
        name, architecture = self.architecture
        metadata = self.header.metadata
        layers, heads, hidden, kv_heads = architecture.config_names

        def count(suffix: str, required: bool = True) -> int | None:
            key = f"{name}.{suffix}"
            value = metadata.get(key)
            if value is None and not required:
                return None
            if isinstance(value, list) and value and len(set(value)) == 1:
                value = value[0]  # a per-layer array with one value throughout
            if isinstance(value, list):
                raise CheckpointError(
                    f"{self.path}: metadata {key} varies by layer ({value[:8]}...); layers with "
                    "different head counts are not supported"
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(
                    f"{self.path}: metadata {key} must be a positive integer, got {value!r:.40}"
                )
            return value

        config: dict[str, object] = {
            "model_type": self._model_type(architecture),
            layers: count(_BLOCK_COUNT),
            heads: count(_HEADS),
            hidden: count(_EMBEDDING),
            kv_heads: count(_KV_HEADS, required=False) or count(_HEADS),
        }
        for key in architecture.head_dim_keys:
            head_dim = count(_HEAD_DIM_KEYS[key], required=False)
            if head_dim is not None:
                config["head_dim"] = head_dim
                break
        intermediate = count("feed_forward_length", required=False)
        if intermediate is not None:
            config["intermediate_size"] = intermediate
        return config, self.path

    def _model_type(self, architecture: Architecture) -> str:
        """llama.cpp stores Mistral models as ``llama``; like transformers' GGUF loader, take
        the model's name to tell them apart, so that a baseline from the original matches."""
        label = self.header.metadata.get("general.name")
        if architecture.model_type == "llama" and "mistral" in str(label).lower():
            return "mistral"
        return architecture.model_type

    def tensors(self, wanted: Callable[[str], bool], head_dim: int) -> TensorMap:
        gguf = gguf_module()
        _, architecture = self.architecture
        header = self.header
        by_kind = {
            gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)] + ".weight": (kind, hf)
            for kind, hf in architecture.tensors.items()
        }
        found: dict[str, TensorSource] = {}
        for stored, placement in header.tensors.items():
            kind_and_name = _layer_template(stored, by_kind)
            if kind_and_name is None:
                continue
            kind, hf_name = kind_and_name
            if not wanted(hf_name):
                continue
            source = _source(header, stored, placement)
            if kind in architecture.transposed:
                source = Transposed(source)
            if architecture.rotary_interleaved and kind in ("ATTN_Q", "ATTN_K"):
                source = RotaryHalves(source, head_dim)
            found[hf_name] = source
        return found


#: a layer number as llama.cpp formats it
_LAYER_NUMBER = re.compile(r"0|[1-9][0-9]{0,8}")


def _layer_template(stored: str, by_kind: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
    """``(kind, transformers name)`` of a ``blk.N.<kind>.weight`` tensor, or None.

    N must be spelt as llama.cpp writes and looks it up (``blk.%d``): ASCII digits, no leading
    zero. Another spelling (``blk.01``, Arabic-Indic or superscript digits) is a tensor
    llama.cpp never reads; taken for layer 1, it could stand in for the real ``blk.1``."""
    parts = stored.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk" or _LAYER_NUMBER.fullmatch(parts[1]) is None:
        return None
    template = f"blk.{{bid}}.{parts[2]}"
    match = by_kind.get(template)
    if match is None:
        return None
    kind, hf = match
    return kind, hf.format(bid=int(parts[1]))


def _source(header: GgufHeader, name: str, placement: Placement) -> TensorSource:
    """The tensor ``name`` as stored: plain floats read as they are, blocks dequantized."""
    code, shape, offset, nbytes = placement
    gguf = gguf_module()
    try:
        kind = gguf.GGMLQuantizationType(code).name
    except ValueError:
        kind = f"GGML type {code}"
    stored = StoredTensor(
        header.path,
        name,
        _PLAIN_TYPES.get(kind, kind),
        shape,
        offset,
        nbytes or 0,
        header.header_sha256,
        header.identity,
        "" if nbytes is not None else f"has {kind}, unknown to the installed gguf package",
    )
    if kind in _PLAIN_TYPES or nbytes is None:
        return stored
    return DequantizedBlocks(stored, code)


@dataclass(frozen=True)
class DequantizedBlocks:
    """A GGUF tensor in quantized blocks, dequantized to float32 with ``gguf.quants``."""

    blocks: StoredTensor
    code: int

    @property
    def name(self) -> str:
        return self.blocks.name

    @property
    def file(self) -> Path:
        return self.blocks.file

    @property
    def dtype(self) -> str:
        return self.blocks.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.blocks.shape

    @property
    def files(self) -> tuple[Path, ...]:
        return self.blocks.files

    @property
    def key(self) -> object:
        return self.blocks.key

    @property
    def problem(self) -> str:
        if self.blocks.reason:
            return self.blocks.reason
        if len(self.shape) != 2:
            return f"has shape {list(self.shape)}; a 2-D weight was expected"
        if not _dequantizable(self.code):
            return (
                f"has GGML type {self.dtype}, which the installed gguf package cannot dequantize "
                f"(upgrade it: {INSTALL} --upgrade)"
            )
        return ""

    def cache_material(self) -> list[object]:
        return ["gguf-blocks", self.code, self.blocks.cache_material()]

    def load(self) -> torch.Tensor:
        import numpy as np
        import torch

        quants = gguf_module().quants
        raw = self.blocks.raw().numpy()
        rows, columns = self.shape
        per_row = len(raw) // rows
        blocks = raw.reshape(rows, per_row)
        weight = torch.empty(rows, columns, dtype=torch.float32)
        # a few MB of output at a time: gguf's dequantizers hold several temporaries
        step = max(1, (4 * MiB) // (4 * columns))
        for start in range(0, rows, step):
            part = quants.dequantize(blocks[start : start + step], self.code)
            weight[start : start + step] = torch.from_numpy(np.asarray(part, dtype=np.float32))
        return weight


@functools.cache
def _dequantizable(code: int) -> bool:
    """Whether the installed gguf can dequantize type ``code`` (tried on one zero block)."""
    import numpy as np

    gguf = gguf_module()
    qtype = gguf.GGMLQuantizationType(code)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class _Header:
    """A cursor over the bytes read from the start of the file, every claim bounded."""

    def __init__(self, path: Path, blob: bytes, file_size: int) -> None:
        self.path, self.blob, self.file_size, self.position = path, blob, file_size, 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def take(self, count: int, what: str) -> bytes:
        end = self.position + count
        if end > len(self.blob):
            if len(self.blob) < self.file_size:
                raise self.fail(
                    f"its metadata runs past {MAX_GGUF_HEADER_BYTES // MiB} MiB (at {what}), more "
                    "than any real GGUF file's; corrupt or hostile, refused"
                )
            raise self.fail(f"ends inside its header (at {what}): truncated or not a GGUF file")
        data = self.blob[self.position : end]
        self.position = end
        return data

    def unpack(self, form: str, what: str) -> int | float:
        layout = struct.Struct("<" + form)
        (value,) = layout.unpack(self.take(layout.size, what))
        return value

    def count(self, what: str, smallest_item: int) -> int:
        """A u64 count of things of at least ``smallest_item`` bytes each, checked against the
        bytes that remain (a claim of 10^12 items in a 1 KB file is refused, not looped on)."""
        value = int(self.unpack("Q", what))
        if value * smallest_item > self.file_size - self.position:
            raise self.fail(
                f"{what} claims {value}, more than the {self.file_size - self.position} "
                "bytes left in the file can hold (corrupt or hostile file)"
            )
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.count(f"the length of {what}", 1)
        if limit is not None and length > limit:
            raise self.fail(f"{what} is {length} bytes long, over {limit}; refused")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` strings without decoding them (a tokenizer's vocabulary)."""
        blob, position, end = self.blob, self.position, len(self.blob)
        length_of = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if position + 8 > end:
                self.position = position
                self.take(8, what)  # raises, saying why
            position += 8 + length_of(blob, position)[0]
        if position > end:
            self.position = end
            self.take(1, what)
        self.position = position


#: GGUF value type code -> (struct format, size); 8 is a string, 9 an array
_SCALARS = {
    0: ("B", 1),
    1: ("b", 1),
    2: ("H", 2),
    3: ("h", 2),
    4: ("I", 4),
    5: ("i", 4),
    6: ("f", 4),
    7: ("?", 1),
    10: ("Q", 8),
    11: ("q", 8),
    12: ("d", 8),
}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse and check the header of the GGUF file ``path``; errors name the file and what
    is wrong. The tensors' bytes are not read."""
    import hashlib

    gguf = gguf_module()
    try:
        with open_regular(path) as (descriptor, status):
            blob = read_at(descriptor, 0, min(status.st_size, MAX_GGUF_HEADER_BYTES))
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    cursor = _Header(path, blob, status.st_size)
    if cursor.take(4, "the magic number") != b"GGUF":
        raise cursor.fail("not a GGUF file (no GGUF magic number at its start)")
    version = int(cursor.unpack("I", "the version"))
    if version & 0xFFFF == 0 and version:
        raise cursor.fail("a big-endian GGUF file; only little-endian files can be read")
    if version not in (2, 3):
        raise cursor.fail(f"GGUF version {version}; versions 2 and 3 can be read")
    tensor_count = cursor.count("the tensor count", 24)
    kv_count = cursor.count("the metadata count", 13)
    metadata: dict[str, object] = {}
    for index in range(kv_count):
        key = cursor.string(f"metadata key {index}", MAX_NAME_BYTES)
        if key in metadata:
            raise cursor.fail(f"metadata key {key!r:.80} appears twice")
        metadata[key] = _value(cursor, int(cursor.unpack("I", key)), key)
    described = []
    for index in range(tensor_count):
        name = cursor.string(f"the name of tensor {index}", MAX_NAME_BYTES)
        dims = int(cursor.unpack("I", f"tensor {name!r}"))
        if not 1 <= dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name!r:.80} has {dims} dimensions (1 to {MAX_DIMS})")
        ne = [int(cursor.unpack("Q", f"tensor {name!r}")) for _ in range(dims)]
        code = int(cursor.unpack("I", f"tensor {name!r}"))
        offset = int(cursor.unpack("Q", f"tensor {name!r}"))
        described.append((name, ne, code, offset))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment {alignment!r:.40} is not a power of two")
    data_start = -(-cursor.position // alignment) * alignment
    header = GgufHeader(
        path,
        FileIdentity.of(status),
        version,
        metadata,
        header_sha256=hashlib.sha256(blob[: cursor.position]).hexdigest(),
    )
    spans = []
    for name, ne, code, offset in described:
        if name in header.tensors:
            raise cursor.fail(f"tensor {name!r:.80} is described twice")
        shape = tuple(reversed(ne))  # GGUF lists the fastest-varying dimension first
        nbytes = _byte_count(cursor, name, ne, code)
        start = data_start + offset
        if nbytes is not None:
            if start + nbytes > status.st_size:
                raise cursor.fail(
                    f"tensor {name!r:.80} ({nbytes} bytes at {start}) lies beyond the "
                    f"{status.st_size}-byte file (truncated or corrupt)"
                )
            if nbytes:
                spans.append((start, start + nbytes, name))
        header.tensors[name] = (code, shape, start, nbytes)
    check_no_overlap(path, spans)
    return header


def _byte_count(cursor: _Header, name: str, ne: list[int], code: int) -> int | None:
    """Bytes of a tensor of ``ne`` elements of GGML type ``code``; None for a type the
    installed gguf does not know (such a tensor refuses only a run that reads it)."""
    gguf = gguf_module()
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(code)]
    except (ValueError, KeyError):
        return None
    if ne[0] % block:
        raise cursor.fail(
            f"tensor {name!r:.80} has rows of {ne[0]} elements, not a whole number of "
            f"{block}-element blocks"
        )
    return math.prod(ne) // block * type_size


def _value(cursor: _Header, kind: int, key: str) -> object:
    """One metadata value: scalars and strings kept, short numeric arrays kept, the rest
    (tokenizer vocabularies) stepped over."""
    if kind in _SCALARS:
        form, _ = _SCALARS[kind]
        return cursor.unpack(form, key)
    if kind == _STRING:
        return cursor.string(key)
    if kind != _ARRAY:
        raise cursor.fail(f"metadata {key!r:.80} has value type {kind}, unknown to GGUF")
    item = int(cursor.unpack("I", key))
    if item == _STRING:
        count = cursor.count(f"the length of {key}", 8)
        cursor.skip_strings(count, key)
        return None
    if item not in _SCALARS:
        raise cursor.fail(f"metadata {key!r:.80} is an array of type {item}; not readable")
    form, size = _SCALARS[item]
    count = cursor.count(f"the length of {key}", size)
    raw = cursor.take(count * size, key)
    if count > MAX_KEPT_ARRAY:
        return None
    return list(struct.unpack(f"<{count}{form}", raw))
