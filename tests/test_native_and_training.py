"""Mistral's native layout, training-framework files and distributed checkpoints, end to end.

Each checkpoint is written the way its tool writes it (Mistral's names and rotary row order,
``torch.save`` of a framework's checkpoint dict, ``torch.distributed.checkpoint.save``), and
every item's singular values are checked against numpy's float64 SVD of the weights.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp  # before any in-process run: torch registers it once
from formats_support import (
    assert_matches_numpy,
    by_layer_and_matrix,
    hf_name,
    run_report,
    write_json,
)
from safetensors.torch import save_file

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.errors import CheckpointError
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    random_llama_weights,
    write_checkpoint,
)
from pytest_spectral.testing.writers import native_tensors, write_mistral_native

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128)
ITEMS = SHAPE.layers * SHAPE.heads * 4


def reference(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict:
    """The transformers-named weights as stored (rounded to ``dtype``), float64."""
    rounded = {name: t.to(dtype).to(torch.float64).numpy() for name, t in weights.items()}
    return by_layer_and_matrix(rounded, hf_name, SHAPE.layers)


class TestMistralNative:
    def test_params_and_consolidated(self, pytester) -> None:
        weights = random_llama_weights(SHAPE, seed=11)
        model = write_mistral_native(pytester.path / "mistral", weights, SHAPE)
        report = run_report(
            pytester, f"--spectral-model={model}", "--spectral-scope=both", items=ITEMS + 14
        )
        assert report["model"]["model_type"] == "mistral"
        assert report["model"]["files"] == ["consolidated.safetensors"]
        assert assert_matches_numpy(report, reference(weights, torch.bfloat16)) == ITEMS + 14

    def test_heads_hold_their_true_rows(self, tmp_path) -> None:
        """Q and K rows come back in transformers' order exactly (not just the same spectra)."""
        weights = random_llama_weights(SHAPE, seed=11)
        model = write_mistral_native(tmp_path / "mistral", weights, SHAPE, dtype=torch.float32)
        checkpoint = open_checkpoint(model)
        for (layer, matrix), source in checkpoint.tensors.items():
            assert torch.equal(source.load(), weights[hf_name(layer, matrix)]), source.name
        assert checkpoint.tensors[(0, "q")].name == "layers.0.attention.wq.weight"

    def test_hugging_face_files_win_and_consolidated_is_never_read(self, pytester) -> None:
        """A Mistral repository holds both; only the index and its shards are read (here the
        consolidated file is not even a safetensors file)."""
        weights = random_llama_weights(SHAPE, seed=11)
        model = write_checkpoint(pytester.path / "both", weights, SHAPE.config(), shards=2)
        write_mistral_native(model, weights, SHAPE)
        (model / "consolidated.safetensors").write_bytes(b"\xff" * 64)
        report = run_report(pytester, f"--spectral-model={model}", items=ITEMS)
        assert all(name.startswith("model-0000") for name in report["model"]["files"])

    def test_params_keys_are_validated(self, tmp_path) -> None:
        model = write_mistral_native(tmp_path / "m", random_llama_weights(SHAPE), SHAPE)
        write_json(model / "params.json", {"dim": 64, "n_layers": "two", "n_heads": 4})
        with pytest.raises(CheckpointError, match=r"params.json: 'n_layers' must be a positive"):
            open_checkpoint(model)


def lightning_checkpoint(state: dict[str, torch.Tensor], config: dict) -> dict:
    """What PyTorch Lightning's ModelCheckpoint saves for a LightningModule holding a
    transformers model as ``self.model`` and its config in save_hyperparameters."""
    optimizer = {
        "state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)} for i in range(2)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1]}],
    }
    return {
        "epoch": 1,
        "global_step": 100,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{name}": t for name, t in state.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 2}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [optimizer],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": config, "lr": 1e-3, "tags": {"a", "b"}},
    }


def deepspeed_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """DeepSpeed's mp_rank_00_model_states.pt (ZeRO stage 1/2: the module's full weights)."""
    return {
        "module": state,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [{name: t.shape for name, t in state.items()}],
        "frozen_param_shapes": None,
        "lr_scheduler": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": 10,
        "global_samples": 80,
        "dp_world_size": 1,
        "mp_world_size": 1,
        "ds_config": {"train_batch_size": 8, "zero_optimization": {"stage": 2}},
        "ds_version": "0.16.0",
    }


class TestTrainingCheckpoints:
    @pytest.mark.parametrize("legacy", [False, True])
    def test_lightning_with_its_config_in_hyper_parameters(self, pytester, legacy) -> None:
        weights = random_llama_weights(SHAPE, seed=12)
        saved = lightning_checkpoint(weights, SHAPE.config())
        path = pytester.mkdir("lightning") / "epoch=1-step=100.ckpt"
        torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
        report = run_report(pytester, f"--spectral-model={path}", items=ITEMS)
        assert assert_matches_numpy(report, reference(weights)) == ITEMS

    def test_deepspeed_module_states_with_spectral_config(self, pytester) -> None:
        weights = random_llama_weights(SHAPE, seed=13)
        folder = pytester.mkdir("global_step10")
        torch.save(deepspeed_checkpoint(weights), folder / "mp_rank_00_model_states.pt")
        without = pytester.runpytest(f"--spectral-model={folder / 'mp_rank_00_model_states.pt'}")
        assert without.ret == pytest.ExitCode.USAGE_ERROR
        without.stderr.fnmatch_lines(["*carries no config*give the model's config.json with*"])
        config = write_json(pytester.path / "config.json", SHAPE.config())
        report = run_report(
            pytester,
            f"--spectral-model={folder / 'mp_rank_00_model_states.pt'}",
            f"--spectral-config={config}",
            items=ITEMS,
        )
        assert assert_matches_numpy(report, reference(weights)) == ITEMS

    def test_nanogpt_linear_weights_compiled(self, pytester) -> None:
        """nanoGPT: GPT-2 built from nn.Linear, saved from a torch.compile'd model."""
        n_layer, n_head, n_embd = 2, 4, 64
        generator = torch.Generator().manual_seed(14)
        state = {}
        linear = {"attn.c_attn": 3 * n_embd, "attn.c_proj": n_embd, "mlp.c_fc": 4 * n_embd}
        for layer in range(n_layer):
            for module, rows in linear.items():
                state[f"_orig_mod.transformer.h.{layer}.{module}.weight"] = torch.randn(
                    rows, n_embd, generator=generator
                )
            state[f"_orig_mod.transformer.h.{layer}.mlp.c_proj.weight"] = torch.randn(
                n_embd, 4 * n_embd, generator=generator
            )
        model_args = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": 64,
                      "bias": False, "vocab_size": 50304, "dropout": 0.0}  # fmt: skip
        saved = {"model": state, "optimizer": {"state": {}, "param_groups": []},
                 "model_args": model_args, "iter_num": 500,
                 "best_val_loss": torch.tensor(3.2), "config": {"batch_size": 12}}  # fmt: skip
        out = pytester.mkdir("out")
        torch.save(saved, out / "ckpt.pt")
        report = run_report(pytester, f"--spectral-model={out / 'ckpt.pt'}", items=32)
        assert report["model"]["model_type"] == "gpt2"
        # Linear [out, in]: head h's Q rows are h*16:(h+1)*16 of c_attn's first 64 rows
        weights = {}
        for layer in range(n_layer):
            qkv = state[f"_orig_mod.transformer.h.{layer}.attn.c_attn.weight"].double().numpy()
            weights[(layer, "q")], weights[(layer, "k")], weights[(layer, "v")] = (
                qkv[:n_embd],
                qkv[n_embd : 2 * n_embd],
                qkv[2 * n_embd :],
            )
            weights[(layer, "o")] = (
                state[f"_orig_mod.transformer.h.{layer}.attn.c_proj.weight"].double().numpy()
            )
        assert assert_matches_numpy(report, weights) == 32

    def test_bare_legacy_state_dict_without_mmap(self, pytester) -> None:
        """A pre-1.6 (non-zip) pytorch_model.bin: read through the restricted unpickler."""
        weights = random_llama_weights(SHAPE, seed=15)
        model = pytester.mkdir("legacy")
        write_json(model / "config.json", SHAPE.config())
        torch.save(
            {n: t.to(torch.float16) for n, t in weights.items()},
            model / "pytorch_model.bin",
            _use_new_zipfile_serialization=False,
        )
        report = run_report(pytester, f"--spectral-model={model}", items=ITEMS)
        assert assert_matches_numpy(report, reference(weights, torch.float16)) == ITEMS


def dcp_save(directory: Path, state: dict) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(directory))


class TestDistributedCheckpoint:
    def test_torchtitan_native_names_in_one_process(self, pytester) -> None:
        weights = random_llama_weights(SHAPE, seed=16)
        native = native_tensors(weights, SHAPE.head_dim)
        dcp_save(pytester.path / "step-10", {"model": native, "optimizer": {}, "step": 10})
        config = write_json(pytester.path / "config.json", SHAPE.config())
        report = run_report(
            pytester, "--spectral-model=step-10", f"--spectral-config={config}",
            "--spectral-scope=both", items=ITEMS + 14,
        )  # fmt: skip
        assert assert_matches_numpy(report, reference(weights)) == ITEMS + 14

    def test_without_a_config(self, tmp_path) -> None:
        dcp_save(tmp_path / "dcp", {"model": random_llama_weights(SHAPE)})
        with pytest.raises(CheckpointError, match=r"carries no model config; give the model's"):
            open_checkpoint(tmp_path / "dcp")

    def test_chunks_saved_by_two_ranks(self, pytester) -> None:
        """FSDP-style: two processes (gloo) each save half of every weight's rows."""
        weights = random_llama_weights(SHAPE, seed=17)
        torch.save(weights, pytester.path / "weights.pt")
        script = pytester.path / "save.py"
        script.write_text(
            textwrap.dedent(f"""
            import os, sys, torch, torch.distributed as dist
            import torch.distributed.checkpoint as dcp
            from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor
            rank = int(sys.argv[1])
            dist.init_process_group("gloo", init_method="file://{pytester.path}/rendezvous",
                                    rank=rank, world_size=2)
            mesh = DeviceMesh("cpu", [0, 1])
            weights = torch.load("{pytester.path}/weights.pt")
            sharded = {{n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in weights.items()}}
            dcp.save({{"model": sharded}}, checkpoint_id="{pytester.path}/fsdp")
            dist.barrier()  # neither rank tears gloo down while the other still uses it
            dist.destroy_process_group()
            """)
        )
        ranks = [subprocess.Popen([sys.executable, str(script), str(r)]) for r in (0, 1)]
        assert [rank.wait(timeout=120) for rank in ranks] == [0, 0]
        assert len(list((pytester.path / "fsdp").glob("*.distcp"))) == 2
        config = write_json(pytester.path / "config.json", SHAPE.config())
        report = run_report(
            pytester, "--spectral-model=fsdp", f"--spectral-config={config}", items=ITEMS
        )
        assert assert_matches_numpy(report, reference(weights)) == ITEMS


class TestWhatIsNotRead:
    """Tensors a run does not read never refuse it."""

    @pytest.mark.parametrize("dtype", ["F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64", "F9_NEW"])
    def test_unknown_or_unanalysable_dtype_outside_attention(self, pytester, dtype) -> None:
        weights = random_llama_weights(SHAPE, seed=18)
        model = write_checkpoint(pytester.path / "fp8", weights, SHAPE.config())
        retype(model / "model.safetensors", "model.layers.0.mlp.down_proj.weight", dtype)
        run_report(pytester, f"--spectral-model={model}", items=ITEMS)
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-scope=matrix")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*tensor 'model.layers.0.mlp.down_proj.weight' has dtype*"])

    def test_index_promising_a_tensor_its_shard_lacks(self, pytester) -> None:
        weights = random_llama_weights(SHAPE, seed=19)
        model = write_checkpoint(pytester.path / "mtp", weights, SHAPE.config(), shards=2)
        index = model / "model.safetensors.index.json"
        document = __import__("json").loads(index.read_text())
        first = sorted(set(document["weight_map"].values()))[0]
        # an MTP layer the config does not count, and an MLP tensor: neither read by head items
        document["weight_map"]["mtp.layers.0.mlp.down_proj.weight"] = first
        drop = "model.layers.1.mlp.up_proj.weight"
        shard = model / document["weight_map"][drop]
        from safetensors.torch import load_file

        kept = {n: t for n, t in load_file(shard).items() if n != drop}
        save_file(kept, shard)
        write_json(index, document)
        run_report(pytester, f"--spectral-model={model}", items=ITEMS)
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-scope=matrix")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*tensor '{drop}' promised by*is missing from the shard*"])


def retype(path: Path, name: str, dtype: str) -> None:
    """Relabel one tensor of a safetensors file with another dtype of the same byte size."""
    import json
    import struct

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    entry = header[name]
    size = entry["data_offsets"][1] - entry["data_offsets"][0]
    element = {"C64": 8}.get(dtype, 1)
    entry["dtype"], entry["shape"] = dtype, [size // element]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    shutil.copystat(path, path)
