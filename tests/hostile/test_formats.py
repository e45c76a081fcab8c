"""Hostile files in the formats beyond Hugging Face's: GGUF, training checkpoints, distributed
checkpoints, LoRA adapters.

Each case runs in a process of its own (the ``hostile`` fixture) and must end in a usage error
naming the file and what is wrong, within 10 s of CPU time and 500 MB, with no traceback and
nothing written.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from test_files import Reduce, pickled, torch_archive

from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights
from pytest_spectral.testing.writers import write_gguf

gguf = pytest.importorskip("gguf")

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=64)


def model_arg(path: Path) -> str:
    return f"--spectral-model={path}"


def a_gguf(root: Path, quantization: str = "Q8_0") -> Path:
    folder = root / "models"
    folder.mkdir(exist_ok=True)
    return write_gguf(
        folder / "model.gguf", random_llama_weights(SHAPE, seed=1), architecture="llama",
        layers=SHAPE.layers, heads=SHAPE.heads, kv_heads=SHAPE.kv_heads, hidden=SHAPE.hidden,
        quantization=quantization,
    )  # fmt: skip


def gguf_bytes(*, tensors: int = 0, kvs: list[bytes] = (), version: int = 3) -> bytes:
    """A GGUF header from parts: magic, version, counts, then the given key/value records."""
    return b"GGUF" + struct.pack("<IQQ", version, tensors, len(kvs)) + b"".join(kvs)


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", 8) + gguf_string(value)


def hostile_gguf(root: Path, data: bytes) -> Path:
    folder = root / "models"
    folder.mkdir(exist_ok=True)
    (folder / "model.gguf").write_bytes(data)
    return folder / "model.gguf"


ARCH = kv_string("general.architecture", "llama")


class TestGguf:
    def test_truncated_in_its_data(self, pytester, hostile) -> None:
        path = a_gguf(pytester.path)
        path.write_bytes(path.read_bytes()[:-100])
        hostile.refused(model_arg(path), naming=["model.gguf", "lies beyond the", "truncated"])

    def test_truncated_in_its_header(self, pytester, hostile) -> None:
        path = a_gguf(pytester.path)
        header_end = gguf.GGUFReader(str(path)).data_offset
        path.write_bytes(path.read_bytes()[: header_end - 40])
        hostile.refused(model_arg(path), naming=["model.gguf", "ends inside its header"])

    @pytest.mark.parametrize(
        ("data", "says"),
        [
            (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62), "the metadata count claims"),
            (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0), "the tensor count claims"),
            (gguf_bytes(kvs=[struct.pack("<Q", 2**63) + b"x"]), "the length of metadata key 0"),
            (
                gguf_bytes(kvs=[ARCH, gguf_string("v") + struct.pack("<IIQ", 9, 8, 10**12)]),
                "the length of v claims 1000000000000",
            ),
            (
                gguf_bytes(kvs=[ARCH, gguf_string("v") + struct.pack("<IIQ", 9, 9, 3)]),
                "is an array of type 9",
            ),
            (gguf_bytes(kvs=[ARCH, gguf_string("v") + struct.pack("<I", 77)]), "value type 77"),
            (gguf_bytes(kvs=[ARCH, ARCH]), "appears twice"),
            (gguf_bytes(version=1), "GGUF version 1"),
            (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
            (b"GGML" + bytes(20), "not a GGUF file"),
            (gguf_bytes(kvs=[kv_string("general.architecture", "mamba")]), "not supported"),
        ],
    )
    def test_absurd_counts_lengths_and_values(self, pytester, hostile, data, says) -> None:
        path = hostile_gguf(pytester.path, data + bytes(64))
        hostile.refused(model_arg(path), naming=["model.gguf", says])

    def test_absurd_tensor_descriptions(self, pytester, hostile) -> None:
        def tensor(name: str, dims: list[int], kind: int, offset: int) -> bytes:
            info = gguf_string(name) + struct.pack("<I", len(dims))
            return info + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", kind, offset)

        cases = {
            "has 9 dimensions": tensor("blk.0.attn_q.weight", [1] * 9, 0, 0),
            "not a whole number of 32-element blocks": tensor("t", [33, 2], 8, 0),
            "lies beyond the": tensor("t", [2**40, 2**20], 0, 0),
        }
        for says, description in cases.items():
            header = gguf_bytes(tensors=1, kvs=[ARCH]) + description
            path = hostile_gguf(pytester.path, header + bytes(64))
            hostile.refused(model_arg(path), naming=["model.gguf", says])

    def test_a_vocabulary_of_millions_of_empty_strings(self, pytester, hostile) -> None:
        """30 MiB of 8-byte string headers: stepped over within the time bound."""
        count = (30 << 20) // 8
        vocabulary = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, count)
        data = gguf_bytes(kvs=[ARCH, vocabulary + bytes(8 * count)])
        path = hostile_gguf(pytester.path, data + bytes(64))
        hostile.refused(model_arg(path), naming=["model.gguf", "block_count must be a positive"])

    def test_metadata_past_32_mib(self, pytester, hostile) -> None:
        big = gguf_string("general.description") + struct.pack("<I", 8) + gguf_string(
            b"x" * (33 << 20)
        )  # fmt: skip
        path = hostile_gguf(pytester.path, gguf_bytes(kvs=[ARCH, big]))
        hostile.refused(model_arg(path), naming=["model.gguf", "metadata runs past 32 MiB"])


EVIL = {
    "os.system": (Reduce(os.system, "touch pwned"), "names posix.system"),
    "bytearray(10**9)": (Reduce(bytearray, 10**9), "names __builtin__.bytearray"),
    "argparse.Namespace": (Reduce(__import__("argparse").Namespace), "names argparse.Namespace"),
}


def containers(state: dict, evil: object) -> dict[str, dict]:
    """The evil object where each training framework keeps plain values."""
    return {
        "lightning": {"state_dict": state, "hyper_parameters": {"lr": evil}},
        "deepspeed": {"module": state, "ds_config": evil, "ds_version": "0.16"},
        "nanogpt": {"model": state, "model_args": {"n_layer": 2}, "config": evil},
    }


class TestTrainingCheckpoints:
    @pytest.mark.parametrize("container", ["lightning", "deepspeed", "nanogpt"])
    @pytest.mark.parametrize("evil", list(EVIL))
    def test_disallowed_global_in_each_container(self, pytester, hostile, container, evil):
        payload, says = EVIL[evil]
        folder = pytester.mkdir("run")
        state = {"w": torch.zeros(2, 2)}
        torch.save(containers(state, payload)[container], folder / "last.ckpt")
        hostile.refused(model_arg(folder / "last.ckpt"), naming=["last.ckpt", says])

    def test_disallowed_global_in_a_legacy_file(self, pytester, hostile) -> None:
        folder = pytester.mkdir("legacy")
        torch.save(
            {"w": torch.zeros(2), "x": Reduce(os.system, "touch pwned")},
            folder / "pytorch_model.bin",
            _use_new_zipfile_serialization=False,
        )
        hostile.refused(
            model_arg(folder / "pytorch_model.bin"), naming=["pytorch_model.bin", "posix.system"]
        )

    def test_legacy_storage_claiming_more_than_the_file(self, pytester, hostile) -> None:
        folder = pytester.mkdir("legacy")
        path = folder / "pytorch_model.bin"
        torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
        data = bytearray(path.read_bytes())
        count = struct.pack("<q", 4)
        at = data.rindex(count)
        data[at : at + 8] = struct.pack("<q", 2**40)
        path.write_bytes(bytes(data))
        hostile.refused(model_arg(path), naming=["pytorch_model.bin", "beyond the file's end"])

    def test_state_dict_pickle_with_a_global_in_the_archive(self, pytester, hostile) -> None:
        folder = pytester.mkdir("zip")
        torch_archive(folder / "model.pt", pickled({"model": {"w": Reduce(eval, "1")}}))
        hostile.refused(model_arg(folder / "model.pt"), naming=["model.pt", "__builtin__.eval"])


    @pytest.mark.parametrize("second", ["state_dict", "module", "model_state_dict"])
    def test_a_second_state_dict_cannot_stand_in(self, pytester, hostile, second) -> None:
        """Kind 2: nanoGPT loads ``model`` (here NaN); a healthy state dict under another
        framework's key must not be analysed in its place."""
        folder = pytester.mkdir("run")
        (folder / "config.json").write_text(json.dumps(SHAPE.config()))
        healthy = random_llama_weights(SHAPE, seed=1)
        broken = {name: torch.full_like(w, float("nan")) for name, w in healthy.items()}
        torch.save({"model": broken, second: healthy, "iter_num": 10}, folder / "ckpt.pt")
        hostile.refused(
            model_arg(folder / "ckpt.pt"),
            naming=["ckpt.pt: holds a state dict under each of", f"'{second}'", "'model'"],
        )

    def test_tensors_beside_the_state_dict_are_no_second_one(self, pytester, hostile) -> None:
        """nanoGPT keeps ``best_val_loss`` as a tensor at the top level."""
        folder = pytester.mkdir("run")
        (folder / "config.json").write_text(json.dumps(SHAPE.config()))
        state = random_llama_weights(SHAPE, seed=1)
        torch.save({"model": state, "best_val_loss": torch.tensor(2.5)}, folder / "ckpt.pt")
        hostile.passes(model_arg(folder / "ckpt.pt"), items=SHAPE.layers * SHAPE.heads * 4)


class TestDistributedCheckpoint:
    def save(self, root: Path) -> Path:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": random_llama_weights(SHAPE)}, checkpoint_id=str(root / "dcp"))
        (root / "dcp" / "config.json").write_text(json.dumps(SHAPE.config()))
        return root / "dcp"

    def test_metadata_naming_a_disallowed_global(self, pytester, hostile) -> None:
        directory = self.save(pytester.path)
        (directory / ".metadata").write_bytes(pickled(Reduce(os.system, "touch pwned"), 4))
        hostile.refused(model_arg(directory), naming=[".metadata", "names posix.system"])

    def test_item_outside_the_directory(self, pytester, hostile) -> None:
        directory = self.save(pytester.path)
        metadata = (directory / ".metadata").read_bytes()
        name = next(p.name for p in directory.glob("*.distcp")).encode()
        escaped = b"../" + name[3:]  # same length: the pickle stays well-formed
        (directory / ".metadata").write_bytes(metadata.replace(name, escaped))
        hostile.refused(model_arg(directory), naming=[".metadata", "leaves the checkpoint"])

    def test_truncated_item_file(self, pytester, hostile) -> None:
        directory = self.save(pytester.path)
        item = next(directory.glob("*.distcp"))
        item.write_bytes(item.read_bytes()[:1000])
        hostile.refused(model_arg(directory), naming=[item.name, "beyond the"])


class TestLoraAdapters:
    def adapter(self, root: Path, lora_b_rows: int) -> tuple[Path, Path]:
        from pytest_spectral.testing.synthetic import write_checkpoint

        base = write_checkpoint(root / "base", random_llama_weights(SHAPE), SHAPE.config())
        adapter = root / "adapter"
        adapter.mkdir()
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        factors = {}
        for layer in range(SHAPE.layers):
            stem = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            factors[f"{stem}.lora_A.weight"] = torch.ones(2, SHAPE.hidden)
            factors[f"{stem}.lora_B.weight"] = torch.ones(lora_b_rows, 2)
        save_file(factors, adapter / "adapter_model.safetensors")
        return base, adapter

    def test_mismatched_factor_shapes(self, pytester, hostile) -> None:
        base, adapter = self.adapter(pytester.path, lora_b_rows=24)
        hostile.refused(
            model_arg(adapter),
            f"--spectral-base-model={base}",
            naming=["q_proj.weight' has shape [32, 32] but its LoRA update", "[24, 32]"],
        )

    def test_rank_disagreeing_with_the_config(self, pytester, hostile) -> None:
        base, adapter = self.adapter(pytester.path, lora_b_rows=32)
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
        hostile.refused(
            model_arg(adapter), f"--spectral-base-model={base}", naming=["rank 3 needs A [3, in]"]
        )

    def test_local_base_path_in_the_adapter_is_not_followed(self, pytester, hostile) -> None:
        base, adapter = self.adapter(pytester.path, lora_b_rows=32)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        hostile.refused(model_arg(adapter), naming=["the merged weights need the base model"])
        assert load_file(adapter / "adapter_model.safetensors")  # untouched

    @pytest.mark.parametrize(
        ("key", "value", "says"),
        [
            ("lora_alpha", 10**400, "'lora_alpha' must be a finite number"),
            ("r", 10**400, "'r' must be a positive integer up to 2147483648"),
            ("alpha_pattern", {"q_proj": 10**400}, "'alpha_pattern' must be an object of finite"),
            ("rank_pattern", {"q_proj": 10**400}, "'rank_pattern' must be an object of positive"),
        ],
        ids=["alpha", "r", "alpha_pattern", "rank_pattern"],
    )
    def test_integers_no_float_can_hold(self, pytester, hostile, key, value, says) -> None:
        """Kind 6: a 401-digit integer is valid JSON, and float() of it raises."""
        base, adapter = self.adapter(pytester.path, lora_b_rows=32)
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        hostile.refused(
            model_arg(adapter),
            f"--spectral-base-model={base}",
            naming=["adapter_config.json", says],
        )

    def test_a_layer_number_of_thousands_of_digits(self, pytester, hostile) -> None:
        """Kind 6: int() of 5,000 digits raises (an INTERNALERROR once)."""
        base, adapter = self.adapter(pytester.path, lora_b_rows=32)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["layers_to_transform"] = [0]
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        factors = load_file(adapter / "adapter_model.safetensors")
        stem = f"base_model.model.model.layers.{'1' * 5000}.self_attn.q_proj"
        factors[f"{stem}.lora_A.weight"] = torch.ones(2, SHAPE.hidden)
        factors[f"{stem}.lora_B.weight"] = torch.ones(SHAPE.hidden, 2)
        save_file(factors, adapter / "adapter_model.safetensors")
        hostile.refused(
            model_arg(adapter),
            f"--spectral-base-model={base}",
            naming=["adapter_config.json: module model.layers.111", "of 5000 digits; refused"],
        )

    def test_base_model_given_with_a_space(self, pytester, hostile) -> None:
        """Kind 1: the base model is a local path like the checkpoint; its space form would
        let an ini file beside it configure the run."""
        base, adapter = self.adapter(pytester.path, lora_b_rows=32)
        hostile.refused(
            model_arg(adapter),
            "--spectral-base-model",
            str(base),
            naming=[
                f"--spectral-base-model {base} (on the command line): with a space",
                f"--spectral-base-model={base}",
            ],
        )

    @pytest.mark.parametrize(
        "option", ["--spectral-report", "--spectral-html", "--spectral-calibrate", "--junitxml"]
    )
    def test_nothing_is_written_inside_the_base_model(self, pytester, hostile, option) -> None:
        """Kind 5: the base model is a checkpoint too; an earlier file there is not even
        removed."""
        base, adapter = self.adapter(pytester.path, lora_b_rows=32)
        target = base / "out.txt"
        target.write_text("earlier\n")
        hostile.refused(
            model_arg(adapter),
            f"--spectral-base-model={base}",
            f"{option}={target}",
            naming=[option, "the base model's directory", str(base)],
        )
        assert target.read_text() == "earlier\n"

    def test_without_a_base_model_the_hub_cache_is_protected(
        self, pytester, hostile, monkeypatch
    ) -> None:
        """The adapter's base then comes from the hub cache, known only once the adapter is
        read: the whole cache is protected from the start."""
        pytest.importorskip("huggingface_hub")
        _, adapter = self.adapter(pytester.path, lora_b_rows=32)
        cache = pytester.mkdir("hf")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        target = cache / "r.json"
        target.write_text("earlier\n")
        hostile.refused(
            model_arg(adapter),
            f"--spectral-report={target}",
            naming=[f"--spectral-report {target}: lies inside the Hugging Face cache {cache}"],
        )
        assert target.read_text() == "earlier\n"

    def test_delta_of_a_config_claiming_a_billion_layers(self, pytester, hostile) -> None:
        """Kind 3: the layers an update covers are read from its tensor names, not tried one
        by one up to the config's count."""
        adapter = pytester.mkdir("adapter")
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        factors = {}
        for layer in (0, 7):
            stem = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            factors[f"{stem}.lora_A.weight"] = torch.randn(2, 64)
            factors[f"{stem}.lora_B.weight"] = torch.randn(64, 2)
        save_file(factors, adapter / "adapter_model.safetensors")
        geometry = {
            "model_type": "llama", "num_hidden_layers": 10**9, "num_attention_heads": 4,
            "num_key_value_heads": 4, "hidden_size": 64,
        }  # fmt: skip
        (pytester.path / "claims.json").write_text(json.dumps(geometry))
        outcome = hostile(
            model_arg(adapter), "--spectral-adapter=delta", "--spectral-config=claims.json"
        )
        assert outcome.exit_code == pytest.ExitCode.OK, outcome.output
        assert "8 passed" in outcome.output


def gguf_named(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A llama GGUF of SHAPE holding ``tensors`` under the GGUF names given, in that order."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(SHAPE.layers)
    writer.add_embedding_length(SHAPE.hidden)
    writer.add_head_count(SHAPE.heads)
    writer.add_head_count_kv(SHAPE.kv_heads)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.to(torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_attention(layer: int, healthy: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(layer)
    kv_rows = SHAPE.kv_heads * SHAPE.head_dim
    shapes = {"attn_q": SHAPE.hidden, "attn_k": kv_rows, "attn_v": kv_rows, "attn_output": 32}
    tensors = {
        f"blk.{layer}.{kind}.weight": torch.randn(rows, SHAPE.hidden)
        for kind, rows in shapes.items()
    }
    if not healthy:
        tensors[f"blk.{layer}.attn_q.weight"].fill_(float("nan"))
    return tensors


class TestGgufLayerNames:
    """Kind 6: a layer is read under the one name llama.cpp gives it (``blk.%d``)."""

    @pytest.mark.parametrize("spelling", ["01", "\u0661", "+1", " 1"])
    def test_another_spelling_cannot_stand_in_for_a_layer(
        self, pytester, hostile, spelling
    ) -> None:
        """A NaN ``blk.1.attn_q`` followed by a healthy ``blk.01.attn_q`` (or Arabic-Indic
        one): the NaN one is analysed, as llama.cpp would use it."""
        folder = pytester.mkdir("models")
        stand_in = gguf_attention(1)["blk.1.attn_q.weight"]
        tensors = {
            **gguf_attention(0),
            **gguf_attention(1, healthy=False),
            f"blk.{spelling}.attn_q.weight": stand_in,
        }
        path = gguf_named(folder / "model.gguf", tensors)
        outcome = hostile(model_arg(path))
        assert outcome.exit_code == pytest.ExitCode.TESTS_FAILED, outcome.output
        assert "4 failed" in outcome.output
        assert "NaN" in outcome.output

    @pytest.mark.parametrize("spelling", ["\u00b2", "\u2460"])
    def test_digits_int_cannot_read_are_other_tensors(self, pytester, hostile, spelling):
        """A superscript or circled digit (``str.isdigit`` but not ``int``) once gave a
        traceback."""
        folder = pytester.mkdir("models")
        tensors = {
            **gguf_attention(0),
            **gguf_attention(1),
            f"blk.{spelling}.attn_q.weight": torch.ones(SHAPE.hidden, SHAPE.hidden),
        }
        path = gguf_named(folder / "model.gguf", tensors)
        outcome = hostile(model_arg(path))
        assert outcome.exit_code == pytest.ExitCode.OK, outcome.output
        assert f"{SHAPE.layers * SHAPE.heads * 4} passed" in outcome.output
