"""Checkpoints as users have them: hub ids, single files, .bin, prefixes and custom layouts."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.errors import CheckpointError
from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights, write_checkpoint

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)
ITEMS = SHAPE.layers * SHAPE.heads * 4


@pytest.fixture
def model(pytester: pytest.Pytester) -> Path:
    return write_checkpoint(
        pytester.path / "model", random_llama_weights(SHAPE, seed=4), SHAPE.config()
    )


def hub_cache(root: Path, repo: str, snapshots: dict[str, Path]) -> None:
    """A Hugging Face cache in its real layout: refs name commits, and a snapshot's files are
    relative symlinks into the repository's ``blobs/``, named by content hash."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for index, (ref, source) in enumerate(snapshots.items()):
        commit = f"{index + 1:040x}"
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in source.iterdir():
            blob = hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copy(file, repo_dir / "blobs" / blob)
            (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
        (repo_dir / "refs" / ref).write_text(commit)


class TestHubIds:
    def test_resolves_offline_from_the_cache(self, pytester, model, monkeypatch) -> None:
        pytest.importorskip("huggingface_hub")
        other = write_checkpoint(
            pytester.path / "other", random_llama_weights(SHAPE, seed=9), SHAPE.config()
        )
        hub_cache(pytester.path / "hf", "org/tiny", {"main": model, "v2": other})
        monkeypatch.setenv("HF_HUB_CACHE", str(pytester.path / "hf"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        main = pytester.runpytest_subprocess(
            "--spectral-model", "org/tiny", "--spectral-report", "main.json", "-p", "no:xdist"
        )
        main.assert_outcomes(passed=ITEMS)
        v2 = pytester.runpytest_subprocess(
            "--spectral-model",
            "org/tiny",
            "--spectral-revision",
            "v2",
            "--spectral-report",
            "v2.json",
            "-n",
            "2",
        )
        v2.assert_outcomes(passed=ITEMS)
        reports = [json.loads((pytester.path / f"{n}.json").read_text()) for n in ("main", "v2")]
        assert reports[0]["model"]["argument"] == "org/tiny"
        assert reports[0]["model"]["path"].endswith(f"snapshots/{1:040x}")
        assert reports[1]["model"]["path"].endswith(f"snapshots/{2:040x}")
        assert (
            reports[0]["items"][0]["singular_values"] != reports[1]["items"][0]["singular_values"]
        )

    def test_uncached_id_offline_is_a_clear_error(self, pytester, monkeypatch) -> None:
        pytest.importorskip("huggingface_hub")
        monkeypatch.setenv("HF_HUB_CACHE", str(pytester.path / "empty"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        result = pytester.runpytest_subprocess("--spectral-model", "org/missing")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                "ERROR: hub model 'org/missing': cannot resolve (HF_HUB_OFFLINE is set*; "
                "it is not in the local cache (HF_HUB_CACHE): unset HF_HUB_OFFLINE*"
            ]
        )

    @pytest.mark.parametrize(
        ("error", "advice"),
        [
            ("GatedRepoError", "the repository is gated: accept its licence*HF_TOKEN*"),
            ("RepositoryNotFoundError", "no such repository, or it is private*HF_TOKEN*"),
            ("RevisionNotFoundError", "the repository has no revision 'v9'*--spectral-revision*"),
            ("ConnectError", "the hub could not be reached and the model is not in the local*"),
        ],
    )
    def test_online_failures_say_what_to_do(self, pytester, monkeypatch, error, advice) -> None:
        hub = pytest.importorskip("huggingface_hub")
        constants = pytest.importorskip("huggingface_hub.constants")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # The hub client's own classes need an HTTP response to exist; the plugin goes by
        # class name (GatedRepoError is a RepositoryNotFoundError there too).
        not_found = type("RepositoryNotFoundError", (OSError,), {})
        failure = {"GatedRepoError": type("GatedRepoError", (not_found,), {})}.get(
            error, type(error, (OSError,), {})
        )

        def model_info(self, repo_id: str, revision: str | None = None) -> object:
            raise failure("401 Client Error")

        monkeypatch.setattr(hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(pytester.path / "empty-cache"))
        result = pytester.runpytest("--spectral-model", "org/tiny", "--spectral-revision", "v9")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [f"ERROR: hub model 'org/tiny' at revision 'v9': cannot resolve: {error}: *; {advice}"]
        )


class TestFiles:
    def test_single_safetensors_file(self, pytester, model) -> None:
        result = pytester.runpytest(f"--spectral-model={model / 'model.safetensors'}")
        result.assert_outcomes(passed=ITEMS)

    def test_single_file_with_config_elsewhere(self, pytester, model) -> None:
        (model / "config.json").rename(pytester.path / "config-elsewhere.json")
        weights = str(model / "model.safetensors")
        missing = pytester.runpytest(f"--spectral-model={weights}")
        assert missing.ret == pytest.ExitCode.USAGE_ERROR
        missing.stderr.fnmatch_lines(["*config.json: missing;*give --spectral-config*"])
        found = pytester.runpytest(
            f"--spectral-model={weights}", "--spectral-config", "config-elsewhere.json"
        )
        found.assert_outcomes(passed=ITEMS)

    @pytest.mark.parametrize("shards", [1, 2])
    def test_pytorch_bin_checkpoints(self, pytester, model, shards: int) -> None:
        tensors = load_file(model / "model.safetensors")
        names = sorted(tensors)
        directory = pytester.path / "bin"
        directory.mkdir()
        shutil.copy(model / "config.json", directory)
        if shards == 1:
            torch.save(tensors, directory / "pytorch_model.bin")
        else:
            halves = [names[: len(names) // 2], names[len(names) // 2 :]]
            weight_map = {}
            for number, part in enumerate(halves, 1):
                filename = f"pytorch_model-0000{number}-of-00002.bin"
                torch.save({n: tensors[n] for n in part}, directory / filename)
                weight_map.update(dict.fromkeys(part, filename))
            (directory / "pytorch_model.bin.index.json").write_text(
                json.dumps({"weight_map": weight_map})
            )
        pytester.runpytest(f"--spectral-model={model}", "--spectral-report", "st.json")
        result = pytester.runpytest(
            f"--spectral-model={directory}", "--spectral-report", "bin.json"
        )
        result.assert_outcomes(passed=ITEMS)
        st, binary = (
            json.loads((pytester.path / n).read_text())["items"] for n in ("st.json", "bin.json")
        )
        assert [i["singular_values"] for i in st] == [i["singular_values"] for i in binary]

    def test_bin_with_pickled_code_is_refused(self, pytester, model) -> None:
        directory = pytester.path / "evil"
        directory.mkdir()
        shutil.copy(model / "config.json", directory)
        torch.save({"weights": object()}, directory / "pytorch_model.bin")
        result = pytester.runpytest(f"--spectral-model={directory}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["*pytorch_model.bin: its pickle names __builtin__.object, which a state dict*"]
        )


class TestNamesAndWrappers:
    def test_weights_without_model_prefix(self, pytester, model) -> None:
        tensors = load_file(model / "model.safetensors")
        save_file(
            {n.removeprefix("model."): t for n, t in tensors.items()}, model / "model.safetensors"
        )
        pytester.runpytest(f"--spectral-model={model}").assert_outcomes(passed=ITEMS)

    def test_multimodal_wrapper_finds_the_text_decoder(self, pytester, model) -> None:
        tensors = load_file(model / "model.safetensors")
        wrapped = {f"language_model.{n}": t for n, t in tensors.items()}
        # A vision tower with its own layers.0.self_attn: the text decoder must win.
        wrapped["vision_tower.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 16)
        save_file(wrapped, model / "model.safetensors")
        text_config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(
            json.dumps({"model_type": "llava", "text_config": text_config})
        )
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-report", "r.json")
        result.assert_outcomes(passed=ITEMS)

    def test_quantized_checkpoint_is_named(self, tmp_path, model) -> None:
        tensors = load_file(model / "model.safetensors")
        name = "model.layers.0.self_attn.q_proj"
        tensors.pop(f"{name}.weight")
        tensors[f"{name}.qweight"] = torch.zeros(4, 32, dtype=torch.int32)
        save_file(tensors, model / "model.safetensors")
        with pytest.raises(CheckpointError, match=r"q_proj.qweight, GPTQ/AWQ packed"):
            open_checkpoint(model)


class TestCustomArchitecture:
    def test_described_in_toml(self, pytester) -> None:
        d, heads, kv, hidden = 8, 4, 2, 32
        generator = torch.Generator().manual_seed(1)
        tensors = {}
        for layer in range(2):
            prefix = f"blocks.{layer}.attn."
            tensors[prefix + "wqkv"] = torch.randn(
                (heads + 2 * kv) * d, hidden, generator=generator
            )
            tensors[prefix + "wo"] = torch.randn(hidden, heads * d, generator=generator)
        directory = pytester.path / "custom"
        directory.mkdir()
        save_file(tensors, directory / "model.safetensors")
        (directory / "config.json").write_text(
            json.dumps(
                {
                    "model_type": "my_model",
                    "n_layers": 2,
                    "n_heads": heads,
                    "n_kv_heads": kv,
                    "dim": hidden,
                }
            )
        )
        unknown = pytester.runpytest(f"--spectral-model={directory}")
        assert unknown.ret == pytest.ExitCode.USAGE_ERROR
        unknown.stderr.fnmatch_lines(["*model_type 'my_model' is not supported; supported: *"])
        (pytester.path / "arch.toml").write_text(
            textwrap.dedent("""
            [architecture]
            layer = "blocks.{layer}.attn."
            qkv = "wqkv"
            o = "wo"
            fused = "concat"
            layers_key = "n_layers"
            heads_key = "n_heads"
            kv_heads_key = "n_kv_heads"
            hidden_key = "dim"
        """)
        )
        result = pytester.runpytest(
            f"--spectral-model={directory}", "--spectral-architecture", "arch.toml"
        )
        result.assert_outcomes(passed=2 * heads * 4)

    def test_bad_description(self, pytester, model) -> None:
        (pytester.path / "arch.toml").write_text('[architecture]\nlayer = "x"\nfused = "zigzag"\n')
        result = pytester.runpytest(
            f"--spectral-model={model}", "--spectral-architecture", "arch.toml"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*arch.toml: [[]architecture] key 'layer': must be a string*"])
