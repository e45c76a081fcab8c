"""PEFT LoRA adapters: the merged weights W + s·B·A, or the update ΔW alone.

Adapters are made by peft itself on tiny transformers models (random, non-zero B). The
reference is numpy float64 arithmetic on the tensors the adapter and base files hold, with the
scale from PEFT's definition (alpha / r, or alpha / √r with rsLoRA); which modules PEFT adapts
is checked against peft's own ``check_target_module_exists``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from formats_support import assert_matches_numpy, by_layer_and_matrix, hf_name, run_report
from safetensors.torch import load_file, save_file

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.checkpoints.formats import ReadOptions
from pytest_spectral.checkpoints.formats.lora import LoraSettings
from pytest_spectral.errors import CheckpointError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LAYERS, HEADS, KV_HEADS, HIDDEN = 2, 4, 2, 64
ITEMS = LAYERS * HEADS * 4


def llama_base(directory: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model


def make_adapter(base: torch.nn.Module, directory: Path, **lora: object) -> Path:
    """A trained-looking adapter: peft's random initialisation of both A and B."""
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **settings))
    model.save_pretrained(directory)
    model.unload()  # leave the base model as it was for the next adapter
    return directory


def expected(base_dir: Path, adapter: Path, *, merged: bool) -> dict:
    """numpy float64: W + s·B·A (or s·B·A) per module, from the files' tensors."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    base = {n: t.double().numpy() for n, t in load_file(base_dir / "model.safetensors").items()}
    result = dict(base) if merged else {}
    for name in factors:
        if not name.endswith("lora_A.weight"):
            continue
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a = factors[name].double().numpy()
        b = factors[name.replace("lora_A", "lora_B")].double().numpy()
        r = a.shape[0]
        scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        delta = scale * (b @ a)
        result[f"{module}.weight"] = (base[f"{module}.weight"] + delta) if merged else delta
    return by_layer_and_matrix(result, hf_name, LAYERS)


@pytest.fixture
def base_and_adapter(pytester) -> tuple[Path, Path]:
    base_dir = pytester.path / "base"
    model = llama_base(base_dir)
    return base_dir, make_adapter(model, pytester.path / "adapter")


class TestMerged:
    def test_with_base_given(self, pytester, base_and_adapter) -> None:
        base, adapter = base_and_adapter
        report = run_report(
            pytester, f"--spectral-model={adapter}", f"--spectral-base-model={base}", items=ITEMS
        )
        assert assert_matches_numpy(report, expected(base, adapter, merged=True)) == ITEMS
        assert "adapter_model.safetensors" in report["model"]["files"]
        assert any(f.endswith("base/model.safetensors") for f in report["model"]["files"])

    def test_merged_agrees_with_peft_merge(self, tmp_path) -> None:
        base_dir = tmp_path / "base"
        model = llama_base(base_dir)
        adapter = make_adapter(model, tmp_path / "adapter", use_rslora=True, lora_alpha=16)
        merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
        checkpoint = open_checkpoint(adapter, options=ReadOptions(base_model=base_dir))
        for (layer, matrix), source in checkpoint.tensors.items():
            reference = merged[hf_name(layer, matrix)].double()
            # peft merges in float32: agreement to float32 rounding, not to 1e-9
            assert torch.allclose(source.load().double(), reference, rtol=0, atol=1e-6), source.name

    def test_base_from_the_hub_cache_named_by_the_adapter(self, pytester, monkeypatch) -> None:
        from test_inputs import hub_cache

        base_dir = pytester.path / "base"
        adapter = make_adapter(llama_base(base_dir), pytester.path / "adapter")
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "org/tiny-base"
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        hub_cache(pytester.path / "hf", "org/tiny-base", {"main": base_dir})
        monkeypatch.setenv("HF_HUB_CACHE", str(pytester.path / "hf"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        report = run_report(pytester, f"--spectral-model={adapter}", items=ITEMS, subprocess=True)
        assert assert_matches_numpy(report, expected(base_dir, adapter, merged=True)) == ITEMS

    def test_without_a_base_says_what_to_give(self, pytester, base_and_adapter) -> None:
        _, adapter = base_and_adapter
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(pytester.path / "base")  # a local path
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        result = pytester.runpytest(f"--spectral-model={adapter}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["*adapter_config.json: the merged weights need the base model*"
             "--spectral-base-model=PATH_OR_HUB_ID*--spectral-adapter=delta*"]
        )  # fmt: skip


class TestDelta:
    def test_without_base_weights(self, pytester, base_and_adapter) -> None:
        base, adapter = base_and_adapter
        report = run_report(
            pytester,
            f"--spectral-model={adapter}",
            "--spectral-adapter=delta",
            f"--spectral-config={base / 'config.json'}",
            items=LAYERS * HEADS * 2,  # q and v only: what the adapter targets
        )
        assert {item["matrix"] for item in report["items"]} == {"q", "v"}
        assert assert_matches_numpy(report, expected(base, adapter, merged=False)) == 16

    def test_layers_to_transform_and_rank_pattern(self, pytester) -> None:
        base_dir = pytester.path / "base"
        adapter = make_adapter(
            llama_base(base_dir), pytester.path / "adapter", layers_to_transform=[1],
            rank_pattern={"v_proj": 2}, target_modules=["q_proj", "v_proj", "o_proj"],
        )  # fmt: skip
        report = run_report(
            pytester, f"--spectral-model={adapter}", "--spectral-adapter=delta",
            f"--spectral-config={base_dir / 'config.json'}", items=HEADS * 3,
        )  # fmt: skip
        assert {item["layer"] for item in report["items"]} == {1}
        assert assert_matches_numpy(report, expected(base_dir, adapter, merged=False)) == 12


def test_gpt2_conv1d_adapter_fan_in_fan_out(pytester) -> None:
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=32)
    model = transformers.GPT2LMHeadModel(config)
    base_dir = pytester.path / "gpt2"
    model.save_pretrained(base_dir)
    adapter = make_adapter(
        model, pytester.path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True
    )
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    checkpoint = open_checkpoint(adapter, options=ReadOptions(base_model=base_dir))
    source = checkpoint.tensors[(1, "q")]
    reference = merged["transformer.h.1.attn.c_attn.weight"].double()
    assert torch.allclose(source.load().double(), reference, rtol=0, atol=1e-6)
    run_report(pytester, f"--spectral-model={adapter}", f"--spectral-base-model={base_dir}")


Q3, V3 = "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj"


@pytest.mark.parametrize(
    ("settings", "module"),
    [
        ({"target_modules": ["q_proj"]}, Q3),
        ({"target_modules": ["q_proj"]}, "model.layers.3.self_attn.k_proj"),
        ({"target_modules": "q_proj"}, Q3),
        ({"target_modules": r".*layers\.[0-2]\..*q_proj"}, Q3),
        ({"target_modules": r".*layers\.[0-3]\..*q_proj"}, Q3),
        ({"target_modules": ["q_proj"], "layers_to_transform": [3]}, Q3),
        ({"target_modules": ["q_proj"], "layers_to_transform": 2}, Q3),
        (
            {"target_modules": ["q_proj"], "layers_to_transform": [3], "layers_pattern": "layers"},
            Q3,
        ),
        ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]}, V3),
        ({"target_modules": [Q3]}, Q3),
    ],
)
def test_targeting_follows_peft(tmp_path, settings, module) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(r=4, **settings)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(config.to_dict(), default=list))
    theirs = check_target_module_exists(config, module)
    adapted = bool(theirs) and type(theirs).__name__ != "_ExcludedModule"
    assert LoraSettings.read(path).targets(module, path) == adapted


class TestBadAdapters:
    def test_factors_that_do_not_fit_the_base(self, pytester, base_and_adapter) -> None:
        base, adapter = base_and_adapter
        factors = load_file(adapter / "adapter_model.safetensors")
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        factors[name] = torch.ones(48, 4)
        save_file(factors, adapter / "adapter_model.safetensors")
        result = pytester.runpytest(f"--spectral-model={adapter}", f"--spectral-base-model={base}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["*'model.layers.0.self_attn.q_proj.weight' has shape [[]64, 64] but its LoRA update*"
             "is [[]48, 64]: the adapter was not trained on this base model"]
        )  # fmt: skip

    def test_dora_and_other_peft_types_are_named(self, tmp_path) -> None:
        for change, says in (({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "IA3")):
            directory = tmp_path / str(len(says))
            directory.mkdir()
            config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, **change}
            (directory / "adapter_config.json").write_text(json.dumps(config))
            with pytest.raises(CheckpointError, match=says):
                open_checkpoint(directory, options=ReadOptions(adapter="delta"))

    def test_a_pattern_that_never_finishes_is_refused(self, tmp_path) -> None:
        path = tmp_path / "adapter_config.json"
        config = {"peft_type": "LORA", "r": 4, "target_modules": "(a|aa)+$"}
        path.write_text(json.dumps(config))
        settings = LoraSettings.read(path)
        with pytest.raises(CheckpointError, match=r"takes over 0.2 s to match"):
            settings.targets("a" * 40 + "!", path)


def test_cache_key_covers_the_adapter_and_the_base(pytester, base_and_adapter) -> None:
    """A re-run is served from the cache; new adapter factors recompute the merged q and v
    (k and o, the base's alone, stay cached); a new base recomputes everything."""
    base, adapter = base_and_adapter
    args = (f"--spectral-model={adapter}", f"--spectral-base-model={base}", "-v", "-p", "no:xdist")

    def cached_in_layer_1() -> str:
        result = pytester.runpytest_subprocess(*args)
        result.assert_outcomes(passed=ITEMS)
        line = next(x for x in result.stdout.lines if x.startswith("spectral: layer 1:"))
        return re.search(r"; (\d+) of \d+ matrices from the cache", line).group(1)

    assert cached_in_layer_1() == "0"
    assert cached_in_layer_1() == "4"
    factors = load_file(adapter / "adapter_model.safetensors")
    save_file({n: t * 2 for n, t in factors.items()}, adapter / "adapter_model.safetensors")
    assert cached_in_layer_1() == "2"
    weights = load_file(base / "model.safetensors")
    save_file({n: t * 2 for n, t in weights.items()}, base / "model.safetensors")
    assert cached_in_layer_1() == "0"
