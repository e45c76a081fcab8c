"""Opening checkpoints: geometry from config.json, tensors from headers, precise errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.checkpoints.formats.safetensors import read_header
from pytest_spectral.errors import CheckpointError


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def rename_tensors(directory: Path, old: str, new: str) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    save_file({name.replace(old, new): t for name, t in tensors.items()}, path)


def open_for_every_item(path: Path) -> None:
    """Open a checkpoint and check every tensor, as a run of all items does."""
    checkpoint = open_checkpoint(path)
    checkpoint.check_readable(checkpoint.tensors)


class TestGeometry:
    def test_grouped_query_attention(self, make_checkpoint) -> None:
        g = open_checkpoint(make_checkpoint(heads=8, kv_heads=2, head_dim=8, hidden=64)).geometry
        assert (g.heads, g.kv_heads, g.group_size) == (8, 2, 4)
        assert [g.kv_head_of(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
        assert g.slice_shape("q") == (8, 64)
        assert g.slice_shape("o") == (64, 8)

    def test_head_dim_defaults_to_hidden_over_heads(self, make_checkpoint) -> None:
        directory = make_checkpoint(heads=4, kv_heads=4, head_dim=16, hidden=64)
        assert "head_dim" not in json.loads((directory / "config.json").read_text())
        assert open_checkpoint(directory).geometry.head_dim == 16

    def test_sharded_and_single_file(self, make_checkpoint) -> None:
        sharded = open_checkpoint(make_checkpoint(shards=3))
        assert len(sharded.files) >= 2
        single = make_checkpoint()
        assert open_checkpoint(single / "model.safetensors").root == single

    @pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
    def test_llama_family(self, make_checkpoint, model_type: str) -> None:
        assert open_checkpoint(make_checkpoint(model_type=model_type)).model_type == model_type


def test_config_without_model_type_in_the_common_layout_is_read_with_a_note(
    tiny_checkpoint: Path,
) -> None:
    edit_config(tiny_checkpoint, model_type=None)
    checkpoint = open_checkpoint(tiny_checkpoint)
    assert checkpoint.notes[0].startswith("spectral: a config without 'model_type' (")
    assert checkpoint.geometry.heads == 4


class TestErrors:
    def expect(self, path: Path, *fragments: str) -> None:
        with pytest.raises(CheckpointError) as info:
            open_for_every_item(path)
        for fragment in fragments:
            assert fragment in str(info.value)

    def test_missing_path(self, tmp_path: Path) -> None:
        self.expect(tmp_path / "nope", "nope: no such file or directory")

    def test_missing_config(self, tiny_checkpoint: Path) -> None:
        (tiny_checkpoint / "config.json").unlink()
        self.expect(tiny_checkpoint, "config.json: missing")

    def test_unknown_architecture_lists_supported(self, tiny_checkpoint: Path) -> None:
        """An undeclared model_type without the common layout (the generic reading needs
        layers.N.self_attn.q_proj) is refused, naming what is supported."""
        edit_config(tiny_checkpoint, model_type="newformer")
        rename_tensors(tiny_checkpoint, "self_attn.", "attention.")
        self.expect(
            tiny_checkpoint,
            "model_type 'newformer' is not supported; supported: llama, mistral",
            "--spectral-architecture",
        )

    def test_undeclared_type_with_a_bad_key_names_the_key(self, tiny_checkpoint: Path) -> None:
        """Read with the common layout, its config fails: the refusal says where."""
        edit_config(tiny_checkpoint, model_type="newformer", num_attention_heads="four")
        self.expect(
            tiny_checkpoint,
            "model_type 'newformer' is not supported (read with the common llama layout: "
            "'num_attention_heads' must be a positive integer, got 'four'); supported: llama",
        )

    def test_config_without_model_type_is_named_so(self, tiny_checkpoint: Path) -> None:
        edit_config(tiny_checkpoint, model_type=None)
        rename_tensors(tiny_checkpoint, "self_attn.", "attention.")
        self.expect(tiny_checkpoint, "a config without 'model_type' is not supported; supported:")

    @pytest.mark.parametrize("model_type", [[], {"llava": 1}, 7])
    def test_model_type_that_is_no_string_is_refused(self, tiny_checkpoint, model_type) -> None:
        """Found by the fuzz test: a list crashed the wrapper lookup (unhashable)."""
        edit_config(tiny_checkpoint, model_type=model_type)
        rename_tensors(tiny_checkpoint, "self_attn.", "attention.")
        self.expect(tiny_checkpoint, f"model_type {model_type!r} is not supported")

    def test_text_config_that_is_no_object_is_refused(self, tiny_checkpoint: Path) -> None:
        edit_config(tiny_checkpoint, model_type="llava", text_config="x")
        self.expect(
            tiny_checkpoint, "config.json: 'text_config' must be an object", "got 'x'"
        )

    def test_model_without_attention_says_so(self, tiny_checkpoint: Path) -> None:
        edit_config(tiny_checkpoint, model_type="mamba")
        self.expect(tiny_checkpoint, "model_type 'mamba' has no attention")

    @pytest.mark.parametrize(
        ("config", "tensor"),
        [({"model_type": "t5"}, "encoder.block.0.layer.0.SelfAttention.q.weight"),
         ({"model_type": "bart", "decoder_attention_heads": 4},
          "encoder.layers.0.self_attn.q_proj.weight")],
    )  # fmt: skip
    def test_encoder_decoder_config_on_other_tensors(self, tiny_checkpoint, config, tensor):
        """A Llama checkpoint whose config says T5 or BART lacks the encoder's tensors, by
        name (BART's num_attention_heads is its encoder's head count: the decoder's is set
        alike, so that the stacks agree)."""
        edit_config(tiny_checkpoint, **config)
        self.expect(
            tiny_checkpoint,
            f"no tensor named like '...{tensor}': this checkpoint does not have the",
            "layout its config.json announces",
        )

    def test_bad_head_count(self, tiny_checkpoint: Path) -> None:
        edit_config(tiny_checkpoint, num_attention_heads=0)
        self.expect(tiny_checkpoint, "'num_attention_heads' must be a positive integer, got 0")

    def test_missing_head_count_is_the_config_class_default(self, tiny_checkpoint: Path) -> None:
        """As LlamaConfig: 32 heads, so 32 K/V heads of head_dim 2 for this 64-wide model."""
        edit_config(tiny_checkpoint, num_attention_heads=None, num_key_value_heads=None)
        self.expect(tiny_checkpoint, "implies [64, 64] (32 key/value heads x head_dim 2)")

    def test_shape_disagreeing_with_config(self, tiny_checkpoint: Path) -> None:
        edit_config(tiny_checkpoint, num_key_value_heads=4)
        self.expect(
            tiny_checkpoint,
            "model.layers.0.self_attn.k_proj.weight' has shape [32, 64]",
            "implies [64, 64] (4 key/value heads x head_dim 16)",
        )

    def test_more_layers_in_config_than_in_weights(self, tiny_checkpoint: Path) -> None:
        edit_config(tiny_checkpoint, num_hidden_layers=3)
        self.expect(tiny_checkpoint, "'model.layers.2.self_attn.q_proj.weight' is missing")

    def test_no_weights(self, tiny_checkpoint: Path) -> None:
        (tiny_checkpoint / "model.safetensors").unlink()
        self.expect(tiny_checkpoint, "no model.safetensors, model.safetensors.index.json")

    def test_index_naming_a_missing_shard(self, make_checkpoint) -> None:
        directory = make_checkpoint(shards=2)
        (directory / "model-00002-of-00002.safetensors").unlink()
        self.expect(
            directory, "shard 'model-00002-of-00002.safetensors'", "no such file or directory"
        )

    def test_truncated_file(self, tiny_checkpoint: Path) -> None:
        path = tiny_checkpoint / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])
        self.expect(tiny_checkpoint, "lie outside the", "data section")

    def test_header_longer_than_file(self, tiny_checkpoint: Path) -> None:
        path = tiny_checkpoint / "model.safetensors"
        path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
        self.expect(tiny_checkpoint, "header claims 1000000000 bytes")

    def test_header_not_json(self, tiny_checkpoint: Path) -> None:
        path = tiny_checkpoint / "model.safetensors"
        path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
        self.expect(tiny_checkpoint, "header is not valid JSON")

    def test_zero_byte_file(self, tiny_checkpoint: Path) -> None:
        (tiny_checkpoint / "model.safetensors").write_bytes(b"")
        self.expect(tiny_checkpoint, "file is 0 bytes, too short to be safetensors")

    def test_quantized_dtype_is_named(self, tiny_checkpoint: Path) -> None:
        path = tiny_checkpoint / "model.safetensors"
        tensors = load_file(path)
        tensors["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(32, 64, dtype=torch.int8)
        save_file(tensors, path)
        self.expect(tiny_checkpoint, "'model.layers.1.self_attn.v_proj.weight' has dtype I8")

    def test_header_reader_rejects_inconsistent_sizes(self, tmp_path: Path) -> None:
        header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}})
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8)
        with pytest.raises(CheckpointError, match="8 bytes stored but shape"):
            read_header(path)
