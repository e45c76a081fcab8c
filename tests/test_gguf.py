"""GGUF files: metadata as the config, tensors dequantized by gguf, llama.cpp's layout undone.

Files are written with gguf's own writer and quantizer, storing the weights as llama.cpp's
converter does (Q/K rows permuted for llama, GPT-2's Conv1D transposed). References are
independent of the plugin: gguf's ``GGUFReader`` and ``dequantize`` for the values, transformers'
GGUF loader for where each head's rows are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from formats_support import assert_matches_numpy, run_report

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.checkpoints.formats.gguf_file import ARCHITECTURES
from pytest_spectral.errors import CheckpointError
from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights
from pytest_spectral.testing.writers import write_gguf

gguf = pytest.importorskip("gguf")

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128)
ITEMS = SHAPE.layers * SHAPE.heads * 4
_KINDS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o"}
_KINDS |= {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}


def llama_gguf(path: Path, quantization: str | dict[str, str], **extra: object) -> Path:
    weights = random_llama_weights(SHAPE, seed=5)
    return write_gguf(
        path,
        weights,
        architecture="llama",
        layers=SHAPE.layers,
        heads=SHAPE.heads,
        kv_heads=SHAPE.kv_heads,
        hidden=SHAPE.hidden,
        quantization=quantization,
        **extra,
    )


def place(pytester: pytest.Pytester, name: str) -> Path:
    """Where a test's weight file goes: its own folder (the run may not start inside it)."""
    folder = pytester.path / "models"
    folder.mkdir(exist_ok=True)
    return folder / name


def dequantized_by_gguf(path: Path) -> dict[tuple[int, str], np.ndarray]:
    """Each layer tensor as gguf's own reader and dequantizer give it (float64, out x in).

    Q and K rows stay in llama.cpp's order: rows move only within a head, which leaves each
    head's singular values unchanged (where the rows go is tested against transformers)."""
    reader = gguf.GGUFReader(str(path))
    found = {}
    for tensor in reader.tensors:
        _, layer, kind, _ = tensor.name.split(".")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        found[(int(layer), _KINDS[kind])] = np.asarray(values, dtype=np.float64)
    return found


@pytest.mark.parametrize("quantization", ["Q8_0", "Q4_1", "Q4_0", "F16", "BF16"])
def test_every_head_and_matrix_matches_gguf_dequantized(pytester, quantization) -> None:
    path = llama_gguf(place(pytester, "model.gguf"), quantization)
    report = run_report(
        pytester, f"--spectral-model={path}", "--spectral-scope=both", items=ITEMS + 2 * 7
    )
    assert report["model"]["model_type"] == "llama"
    assert report["model"]["dtype"] == quantization
    assert report["model"]["files"] == ["model.gguf"]
    assert assert_matches_numpy(report, dequantized_by_gguf(path)) == ITEMS + 2 * 7


#: where each K-quant block keeps its float16 scale(s): (offset, ...) in the block
_F16_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82)}


def random_blocks(rows: int, columns: int, qtype_name: str, seed: int) -> np.ndarray:
    """Random blocks of a K-quant type (gguf can dequantize these but not quantize to them),
    with finite scales: bytes as a file would hold them."""
    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, columns // block, size), np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for offset in _F16_SCALES[qtype_name]:
        data[:, :, offset : offset + 2] = scale
    return data.reshape(rows, -1)


def test_k_quants(pytester) -> None:
    """K-quant blocks (rows of 256), each matrix in its own type."""
    types = {"q": "Q4_K", "k": "Q6_K", "v": "Q5_K", "o": "Q3_K"}
    heads, head_dim, hidden = 4, 64, 256
    path = place(pytester, "k.gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", hidden)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    for seed, (matrix, kind) in enumerate(_KINDS.items()):
        if kind not in types:
            continue
        blocks = random_blocks(heads * head_dim, hidden, types[kind], seed)
        qtype = gguf.GGMLQuantizationType[types[kind]]
        writer.add_tensor(f"blk.0.{matrix}.weight", blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = run_report(pytester, f"--spectral-model={path}", items=16)
    assert assert_matches_numpy(report, dequantized_by_gguf(path)) == 16


def test_rows_are_where_transformers_gguf_loader_puts_them(tmp_path) -> None:
    """Exact F32 weights: the plugin's tensor is the original, and transformers' own GGUF
    loader (which undoes llama.cpp's permutation its own way) gives the same."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = llama_gguf(tmp_path / "f32.gguf", "F32")
    original = random_llama_weights(SHAPE, seed=5)
    config = transformers.LlamaConfig(
        hidden_size=SHAPE.hidden, intermediate_size=SHAPE.intermediate,
        num_hidden_layers=SHAPE.layers, num_attention_heads=SHAPE.heads,
        num_key_value_heads=SHAPE.kv_heads, vocab_size=SHAPE.vocab,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    checkpoint = open_checkpoint(path)
    for (layer, matrix), source in checkpoint.tensors.items():
        name = source.name
        ours = source.load()
        hf = f"model.layers.{layer}.{'mlp' if matrix in ('gate', 'up', 'down') else 'self_attn'}"
        hf += f".{matrix}_proj.weight"
        assert torch.equal(ours, original[hf]), name
        assert torch.equal(ours, loaded[hf]), name


@pytest.mark.parametrize("architecture", ["gpt2", "phi3"])
def test_fused_layouts_match_transformers_gguf_loader(tmp_path, architecture) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    torch.manual_seed(0)
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=32)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.Phi3Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=32, pad_token_id=0,
        )  # fmt: skip
        model = transformers.Phi3ForCausalLM(config)
    state = model.state_dict()
    path = write_gguf(
        tmp_path / f"{architecture}.gguf", state, architecture=architecture, layers=2,
        heads=4, kv_heads=4 if architecture == "gpt2" else 2, hidden=64,
    )  # fmt: skip
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    checkpoint = open_checkpoint(path)
    assert checkpoint.model_type == architecture
    for (layer, matrix), source in checkpoint.tensors.items():
        hf = next(n for n in loaded if n.endswith(source_suffix(architecture, layer, matrix)))
        assert torch.equal(source.load(), loaded[hf]), (source.name, hf)
        assert torch.equal(source.load(), state[hf].float()), (source.name, hf)


def source_suffix(architecture: str, layer: int, matrix: str) -> str:
    if architecture == "gpt2":
        module = {"q": "attn.c_attn", "o": "attn.c_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
        return f"h.{layer}.{module.get(matrix, 'attn.c_attn')}.weight"
    module = {"o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}
    return f"layers.{layer}.{module.get(matrix, 'self_attn.qkv_proj')}.weight"


def test_tensor_names_agree_with_gguf_name_map() -> None:
    """Every transformers name the plugin gives a GGUF tensor is the one gguf-py maps to it."""
    for name, architecture in ARCHITECTURES.items():
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)
        name_map = gguf.get_tensor_name_map(arch, 2)
        for kind, hf in architecture.tensors.items():
            stored = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=1)
            assert name_map.get_name(hf.format(bid=1).removesuffix(".weight")) == stored


def test_head_dim_from_key_length_and_mistral_by_name(pytester) -> None:
    shape = LlamaShape(layers=1, heads=4, kv_heads=2, head_dim=32, hidden=64, mlp=False)
    weights = random_llama_weights(shape, seed=3)
    path = write_gguf(
        place(pytester, "m.gguf"), weights, architecture="llama", layers=1, heads=4, kv_heads=2,
        hidden=64, head_dim=32, name="Mistral 7B Instruct v0.3", quantization="Q8_0",
    )  # fmt: skip
    report = run_report(pytester, f"--spectral-model={path}", items=16)
    assert report["model"]["model_type"] == "mistral"
    assert report["model"]["head_dim"] == 32
    assert assert_matches_numpy(report, dequantized_by_gguf(path)) == 16


def test_quantized_release_against_its_original_as_a_baseline(pytester) -> None:
    """The README recipe: the original's report as the baseline of its GGUF quantization;
    per-head drift stays small at Q8_0 and grows at Q4_0."""
    from pytest_spectral.testing.synthetic import write_checkpoint

    original = write_checkpoint(
        pytester.path / "original", random_llama_weights(SHAPE, seed=5), SHAPE.config("float32"),
        dtype=torch.float32,
    )  # fmt: skip
    run_report(pytester, f"--spectral-model={original}", items=ITEMS)
    (pytester.path / "report.json").rename(pytester.path / "original.json")
    rules = pytester.path / "drift.toml"
    rules.write_text('[[rules]]\nmetric = "spectral_norm"\nmax_change = 0.01\nmin_change = -0.01\n')
    for quantization, fails in (("Q8_0", False), ("Q4_0", True)):
        path = llama_gguf(place(pytester, f"{quantization}.gguf"), quantization)
        result = pytester.runpytest(
            f"--spectral-model={path}", "--spectral-baseline=original.json",
            f"--spectral-thresholds={rules}",
        )  # fmt: skip
        assert (result.ret == pytest.ExitCode.TESTS_FAILED) is fails, result.stdout.str()


class TestBadGguf:
    def test_unsupported_architecture(self, tmp_path) -> None:
        path = write_gguf(
            tmp_path / "x.gguf", {}, architecture="mamba", layers=1, heads=1, kv_heads=1, hidden=8
        )
        with pytest.raises(CheckpointError, match=r"GGUF architecture 'mamba' is not supported"):
            open_checkpoint(path)

    def test_missing_head_count(self, tmp_path) -> None:
        path = llama_gguf(tmp_path / "m.gguf", "F32")
        key = b"llama.attention.head_count\x04"
        data = path.read_bytes().replace(key, key.replace(b"count", b"cxunt"), 1)
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=r"llama.attention.head_count must be a positive"):
            open_checkpoint(path)

    def test_gguf_package_missing_says_what_to_install(self, tmp_path, monkeypatch) -> None:
        import builtins

        path = llama_gguf(tmp_path / "m.gguf", "F32")
        real_import = builtins.__import__

        def no_gguf(name: str, *args: object, **kwargs: object) -> object:
            if name == "gguf":
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_gguf)
        with pytest.raises(CheckpointError, match=r"pip install 'pytest-spectral\[gguf\]'"):
            open_checkpoint(path)
