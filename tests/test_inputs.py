"""Checkpoints as users have them: hub ids, single files, .bin, prefixes and custom layouts."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from fnmatch import fnmatch
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
            "--spectral-model", "org/tiny", "--spectral-report=main.json", "-p", "no:xdist"
        )
        main.assert_outcomes(passed=ITEMS)
        v2 = pytester.runpytest_subprocess(
            "--spectral-model",
            "org/tiny",
            "--spectral-revision",
            "v2",
            "--spectral-report=v2.json",
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

    @staticmethod
    def repository(root: Path, model: Path, weights: str) -> Path:
        """A hub repository on disk: ``model``'s weights sharded in two, as safetensors or
        as ``.bin`` files, each with its index, beside files a run never reads (tokenizer,
        generation config, the other format's shards, optimizer state, Flax weights,
        Meta's original files), which hold nothing readable."""
        root.mkdir()
        shutil.copy(model / "config.json", root)
        tensors = load_file(model / "model.safetensors")
        names = sorted(tensors)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        formats = {
            "safetensors": ("model-0000{}-of-00002.safetensors", "model.safetensors.index.json"),
            "bin": ("pytorch_model-0000{}-of-00002.bin", "pytorch_model.bin.index.json"),
        }
        for kind, (pattern, index) in formats.items():
            if kind != weights:
                for number in (1, 2):
                    (root / pattern.format(number)).write_bytes(b"never read")
                continue
            weight_map = {}
            for number, part in enumerate(halves, 1):
                filename = pattern.format(number)
                if kind == "bin":
                    torch.save({n: tensors[n] for n in part}, root / filename)
                else:
                    save_file({n: tensors[n] for n in part}, str(root / filename))
                weight_map.update(dict.fromkeys(part, filename))
            (root / index).write_text(json.dumps({"weight_map": weight_map}))
        for name in ("generation_config.json", "tokenizer.json", "optimizer.pt"):
            (root / name).write_bytes(b"never read")
        (root / "flax_model.msgpack").write_bytes(b"never read")
        (root / "original").mkdir()
        (root / "original" / "consolidated.00.pth").write_bytes(b"never read")
        return root

    @pytest.mark.parametrize("revision", [None, "v2"])
    @pytest.mark.parametrize(
        ("weights", "index", "shards"),
        [
            (
                "safetensors",
                "model.safetensors.index.json",
                ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
            ),
            (
                "bin",
                "pytorch_model.bin.index.json",
                ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"],
            ),
        ],
    )
    def test_download_asks_for_the_revision_and_only_what_is_read(
        self, pytester, model, monkeypatch, revision, weights, index, shards
    ) -> None:
        """The revision is resolved to a commit in one request; the index is fetched at that
        commit, then the config, the index and the shards it lists, and nothing else (the
        run passes on exactly those files)."""
        hub = pytest.importorskip("huggingface_hub")
        constants = pytest.importorskip("huggingface_hub.constants")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        source = self.repository(pytester.path / "repository", model, weights)
        listing = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
        commit = "c0ffee" * 6 + "abcd"
        snapshot = pytester.path / "snapshots" / commit
        snapshot.mkdir(parents=True)
        calls: list[tuple[object, ...]] = []

        class Info:
            sha = commit
            siblings = tuple(type("Sibling", (), {"rfilename": name}) for name in listing)

        def model_info(self, repo_id: str, *, revision: str | None = None) -> Info:
            calls.append(("info", repo_id, revision))
            return Info()

        def snapshot_download(
            repo_id: str, *, revision: str | None = None, allow_patterns: list[str]
        ) -> str:
            fetched = sorted(f for f in listing if any(fnmatch(f, p) for p in allow_patterns))
            calls.append(("download", repo_id, revision, tuple(fetched)))
            for name in fetched:
                shutil.copy(source / name, snapshot / name)
            return str(snapshot)

        monkeypatch.setattr(hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
        args = ("--spectral-revision", revision) if revision else ()
        result = pytester.runpytest("--spectral-model", "org/tiny", *args, "-p", "no:xdist")
        result.assert_outcomes(passed=ITEMS)
        assert calls == [
            ("info", "org/tiny", revision),
            ("download", "org/tiny", commit, (index,)),
            ("download", "org/tiny", commit, tuple(sorted(["config.json", index, *shards]))),
        ]
        assert sorted(p.name for p in snapshot.iterdir()) == sorted(["config.json", index, *shards])

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

        def model_info(self, repo_id: str, *, revision: str | None = None) -> object:
            assert (repo_id, revision) == ("org/tiny", "v9")
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
            f"--spectral-model={weights}", "--spectral-config=config-elsewhere.json"
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
        pytester.runpytest(f"--spectral-model={model}", "--spectral-report=st.json")
        result = pytester.runpytest(f"--spectral-model={directory}", "--spectral-report=bin.json")
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

    @pytest.mark.parametrize("wrapper", ["llava", "an_undeclared_vlm"])
    def test_multimodal_wrapper_finds_the_text_decoder(self, pytester, model, wrapper) -> None:
        """A declared wrapper, and any model_type whose text_config holds a supported one."""
        tensors = load_file(model / "model.safetensors")
        wrapped = {f"language_model.{n}": t for n, t in tensors.items()}
        # A vision tower with its own layers.0.self_attn: the text decoder must win.
        wrapped["vision_tower.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 16)
        save_file(wrapped, model / "model.safetensors")
        text_config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(
            json.dumps({"model_type": wrapper, "text_config": text_config})
        )
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-report=r.json")
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
        unknown.stderr.fnmatch_lines(
            [
                "*model_type 'my_model' is not supported (read with the common llama layout: "
                "has no key 'num_hidden_layers'); supported: *"
            ]
        )
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
            f"--spectral-model={directory}", "--spectral-architecture=arch.toml"
        )
        result.assert_outcomes(passed=2 * heads * 4)

    def test_undeclared_model_type_with_the_common_layout_is_analysed(
        self, pytester, model
    ) -> None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "newllama"}))
        result = pytester.runpytest(f"--spectral-model={model}")
        result.assert_outcomes(passed=SHAPE.layers * SHAPE.heads * 4)
        result.stdout.fnmatch_lines(
            [
                "spectral: model_type 'newllama' (*config.json) is not one the plugin declares; "
                "its tensors follow layers.N.self_attn.{q,k,v,o}_proj, analysed as the llama "
                "layout (K/V heads from num_key_value_heads, else one per query head; head_dim "
                "from head_dim, else hidden_size / num_attention_heads)"
            ]
        )

    def test_mlp_keys_add_whole_matrix_mlp_items(self, pytester) -> None:
        """A synthetic Llama checkpoint described by hand: 4 attention matrices and, with
        the MLP keys, its gate, up and down projections per layer at matrix scope."""
        shape = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32)
        model = write_checkpoint(
            pytester.path / "model", random_llama_weights(shape, seed=4), shape.config()
        )
        description = textwrap.dedent("""
            [architecture]
            layer = "model.layers.{layer}.self_attn."
            q = "q_proj.weight"
            k = "k_proj.weight"
            v = "v_proj.weight"
            o = "o_proj.weight"
        """)
        arch = pytester.path / "arch.toml"
        arch.write_text(description)
        layers = open_checkpoint(model).geometry.layers
        attention_only = pytester.runpytest(
            f"--spectral-model={model}", f"--spectral-architecture={arch}",
            "--spectral-scope=matrix",
        )  # fmt: skip
        attention_only.assert_outcomes(passed=layers * 4)
        attention_only.stdout.fnmatch_lines(
            [
                "spectral: matrix scope analyses attention only: the --spectral-architecture "
                "file names no MLP tensors (add mlp_layer and gate, up, gate_up, down, fc1 or "
                "fc2 keys to include them)"
            ]
        )
        arch.write_text(
            description
            + 'mlp_layer = "model.layers.{layer}.mlp."\n'
            + 'gate = "gate_proj.weight"\nup = "up_proj.weight"\ndown = "down_proj.weight"\n'
        )
        with_mlp = pytester.runpytest(
            f"--spectral-model={model}", f"--spectral-architecture={arch}",
            "--spectral-scope=matrix",
        )  # fmt: skip
        with_mlp.assert_outcomes(passed=layers * 7)
        assert "analyses attention only" not in with_mlp.stdout.str()

    @pytest.mark.parametrize(
        ("edit", "message"),
        [
            (("w1.weight", "w9.weight"),
             "arch.toml: [[]architecture] keys 'mlp_layer' and 'gate' name tensor "
             "'...blocks.0.ffn.w9.weight' (layer 0), which the checkpoint does not have"),
            (('"wo.weight"', '"wx.weight"'),
             "arch.toml: [[]architecture] keys 'layer' and 'o' name tensor "
             "'...blocks.0.attn.wx.weight' (layer 0), which the checkpoint does not have"),
            (('"wqkv.weight"', '"wqkv"'),
             "arch.toml: [[]architecture] keys 'layer' and 'qkv' name tensor "
             "'...blocks.0.attn.wqkv' (layer 0), which the checkpoint does not have; it has "
             "'...blocks.0.attn.wqkv.weight': write qkv = \"wqkv.weight\""),
            (('hidden_key = "dim"', 'hidden_key = "nope"'),
             "*config.json: has no key 'nope' (the key */arch.toml names)"),
        ],
    )  # fmt: skip
    def test_every_tensor_and_key_the_file_names_must_exist(
        self, pytester, edit: tuple[str, str], message: str
    ) -> None:
        """A description with a wrong name is refused, naming the file, its keys and what
        is missing, rather than analysing less than it describes."""
        generator = torch.Generator().manual_seed(5)
        tensors = {}
        for layer in range(2):
            shapes = {"attn.wqkv": (128, 64), "attn.wo": (64, 64), "ffn.w1": (96, 64),
                      "ffn.w3": (96, 64), "ffn.w2": (64, 96)}  # fmt: skip
            for name, shape in shapes.items():
                tensors[f"blocks.{layer}.{name}.weight"] = torch.randn(*shape, generator=generator)
        directory = pytester.path / "custom"
        directory.mkdir()
        save_file(tensors, directory / "model.safetensors")
        config = {"model_type": "mynet", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "dim": 64}
        (directory / "config.json").write_text(json.dumps(config))
        description = textwrap.dedent("""
            [architecture]
            layer = "blocks.{layer}.attn."
            qkv = "wqkv.weight"
            o = "wo.weight"
            fused = "concat"
            layers_key = "n_layers"
            heads_key = "n_heads"
            kv_heads_key = "n_kv_heads"
            hidden_key = "dim"
            mlp_layer = "blocks.{layer}.ffn."
            gate = "w1.weight"
            up = "w3.weight"
            down = "w2.weight"
        """)
        arch = pytester.path / "arch.toml"
        arch.write_text(description)
        run = (f"--spectral-model={directory}", f"--spectral-architecture={arch}")
        pytester.runpytest(*run, "--spectral-scope=matrix").assert_outcomes(passed=2 * 7)
        arch.write_text(description.replace(*edit))
        for scope in ("head", "matrix"):
            result = pytester.runpytest(*run, f"--spectral-scope={scope}")
            assert result.ret == pytest.ExitCode.USAGE_ERROR
            result.stderr.fnmatch_lines([f"ERROR: *{message}"])
            assert "Traceback" not in result.stderr.str()

    def test_interleaved_layout_with_fewer_kv_heads_is_refused_by_name(self, pytester) -> None:
        """Its fused tensor has the (heads + 2 kv) x head_dim rows the shape check expects,
        but interleaved q, k, v per head cannot share K/V heads."""
        heads, kv, d, hidden = 4, 2, 8, 32
        directory = pytester.path / "custom"
        directory.mkdir()
        save_file(
            {
                f"blocks.{layer}.attn.{name}": torch.randn(rows, cols)
                for layer in range(2)
                for name, rows, cols in (
                    ("wqkv", (heads + 2 * kv) * d, hidden),
                    ("wo", hidden, heads * d),
                )
            },
            directory / "model.safetensors",
        )
        config = {"model_type": "my_model", "num_hidden_layers": 2, "hidden_size": hidden}
        config |= {"num_attention_heads": heads, "num_key_value_heads": kv}
        (directory / "config.json").write_text(json.dumps(config))
        (pytester.path / "arch.toml").write_text(
            '[architecture]\nlayer = "blocks.{layer}.attn."\nqkv = "wqkv"\no = "wo"\n'
            'fused = "interleaved"\n'
        )
        result = pytester.runpytest(
            f"--spectral-model={directory}", "--spectral-architecture=arch.toml"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                "*config.json: the interleaved fused layout holds q, k and v of every head in "
                "turn, so it needs as many key/value heads as query heads; the config gives 2 "
                "key/value heads for 4 query heads*"
            ]
        )
        assert "Traceback" not in result.stderr.str()

    def test_bad_description(self, pytester, model) -> None:
        (pytester.path / "arch.toml").write_text('[architecture]\nlayer = "x"\nfused = "zigzag"\n')
        result = pytester.runpytest(
            f"--spectral-model={model}", "--spectral-architecture=arch.toml"
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*arch.toml: [[]architecture] key 'layer': must be a string*"])
