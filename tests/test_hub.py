"""Hub ids as transformers resolves them, and local paths that never turn into hub ids."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_inputs import hub_cache

from pytest_spectral.checkpoints.hub import files_to_fetch, hub_id_of
from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights, write_checkpoint

pytest.importorskip("huggingface_hub")

SHAPE = LlamaShape(layers=1, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)
ITEMS = SHAPE.layers * SHAPE.heads * 4


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DroppingEndpoint:
    """A local hub endpoint that accepts each connection and closes it unanswered,
    counting them: how many times a run tried the hub, whatever the machine's load."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            client.close()

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def dropping_hub(pytester, monkeypatch) -> Iterator[tuple[Path, DroppingEndpoint]]:
    """A hub cache, and an endpoint that drops every connection; HF_HUB_OFFLINE unset."""
    cache = pytester.path / "hf"
    endpoint = DroppingEndpoint()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", endpoint.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield cache, endpoint
    endpoint.close()


@pytest.fixture
def unreachable_hub(pytester, monkeypatch) -> Path:
    """A hub cache, and an endpoint that refuses connections; HF_HUB_OFFLINE unset."""
    cache = pytester.path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def cached_model(pytester, cache: Path, repo: str) -> None:
    model = write_checkpoint(pytester.path / "src", random_llama_weights(SHAPE), SHAPE.config())
    hub_cache(cache, repo, {"main": model})


class TestUnreachableHub:
    @pytest.mark.parametrize("argument", ["org/tiny", "hf://org/tiny"])
    def test_cached_snapshot_without_retries(self, pytester, dropping_hub, argument) -> None:
        cache, endpoint = dropping_hub
        cached_model(pytester, cache, "org/tiny")
        result = pytester.runpytest_subprocess(f"--spectral-model={argument}")
        result.assert_outcomes(passed=ITEMS)
        assert "Retrying" not in result.stdout.str() + result.stderr.str()
        # one request for the snapshot (huggingface_hub's client reconnects once after a
        # dropped connection), then the cache; a file download's retries make 5 or more
        assert endpoint.connections <= 2

    def test_id_without_an_owner(self, pytester, unreachable_hub) -> None:
        cached_model(pytester, unreachable_hub, "gpt2")
        pytester.runpytest_subprocess("--spectral-model", "gpt2").assert_outcomes(passed=ITEMS)

    def test_not_cached_says_so_at_once(self, pytester, unreachable_hub) -> None:
        start = time.monotonic()
        result = pytester.runpytest_subprocess("--spectral-model=org/absent")
        seconds = time.monotonic() - start
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["*hub model 'org/absent': cannot resolve*the hub could not be reached and the model "
             "is not in the local cache*"]
        )  # fmt: skip
        assert "Retrying" not in result.stdout.str() + result.stderr.str()
        # a usage error, before any item: start-up alone (retries would sleep over 20 s)
        with pytest.MonkeyPatch.context() as offline:
            offline.setenv("HF_HUB_OFFLINE", "1")
            start = time.monotonic()
            pytester.runpytest_subprocess("--spectral-model=org/absent")
            reference = time.monotonic() - start
        assert seconds - reference < 10


class TestLocalLookingArguments:
    @pytest.mark.parametrize(
        "argument", ["examples/tiny-lama", "out/final", "./model", "/nonexistent/model", "~x/y"]
    )
    def test_missing_path_is_no_such_file_at_once(
        self, pytester, unreachable_hub, argument
    ) -> None:
        for folder in ("examples", "out"):
            pytester.mkdir(folder)
        result = pytester.runpytest(f"--spectral-model={argument}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"ERROR: {argument}: no such file or directory*"])
        assert "hub model" not in result.stderr.str()
        hint = f"write hf://{argument}" in result.stderr.str()
        assert hint == (argument in ("examples/tiny-lama", "out/final"))

    @pytest.mark.parametrize(
        ("argument", "repo_id"),
        [
            ("gpt2", "gpt2"),
            ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B"),
            ("hf://gpt2", "gpt2"),
            ("hf://org/name.v2", "org/name.v2"),
            ("model.safetensors", None),
            ("ckpt.gguf", None),
            ("a/b/c", None),
            (".hidden", None),
            ("org/--bad", None),
        ],
    )
    def test_what_is_a_hub_id(self, argument, repo_id) -> None:
        assert hub_id_of(argument) == repo_id

    def test_existing_owner_folder_makes_it_local(self, tmp_path, monkeypatch) -> None:
        monkeypatch.chdir(tmp_path)
        assert hub_id_of("org/name") == "org/name"
        (tmp_path / "org").mkdir()
        assert hub_id_of("org/name") is None

    def test_bad_explicit_id(self, pytester) -> None:
        result = pytester.runpytest("--spectral-model=hf://org/a..b")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*hf://org/a..b: not a hub id; write hf://ORG/NAME*"])


MISTRAL_REPO = [
    ".gitattributes", "README.md", "config.json", "generation_config.json",
    "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors", "model.safetensors.index.json",
    "consolidated.safetensors", "params.json", "tokenizer.json", "tokenizer.model",
    "original/consolidated.00.pth", "original/params.json",
]  # fmt: skip


class TestOnlyTheFilesARunReads:
    def test_index_and_its_shards_never_consolidated(self) -> None:
        shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert files_to_fetch(MISTRAL_REPO, shards) == [
            "config.json", "model.safetensors.index.json", *shards
        ]  # fmt: skip

    @pytest.mark.parametrize(
        ("files", "fetched"),
        [
            (["config.json", "model.safetensors", "pytorch_model.bin"],
             ["config.json", "model.safetensors"]),
            (["config.json", "pytorch_model.bin", "tf_model.h5"],
             ["config.json", "pytorch_model.bin"]),
            (["adapter_config.json", "adapter_model.safetensors", "README.md"],
             ["adapter_config.json", "adapter_model.safetensors"]),
            (["params.json", "consolidated.safetensors", "tekken.json"],
             ["params.json", "consolidated.safetensors"]),
            (["model-q4.gguf", "README.md"], []),
        ],
    )  # fmt: skip
    def test_other_layouts(self, files, fetched) -> None:
        assert files_to_fetch(files) == fetched

    def test_online_download_asks_for_exactly_those(self, pytester, monkeypatch) -> None:
        """With the hub answering (stood in for by its client's two calls), the index is
        fetched first, then only the shards it lists."""
        hub = pytest.importorskip("huggingface_hub")
        constants = pytest.importorskip("huggingface_hub.constants")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        model = write_checkpoint(
            pytester.path / "src", random_llama_weights(SHAPE), SHAPE.config(), shards=2
        )
        listing = [*MISTRAL_REPO[:4], *(p.name for p in model.iterdir())]
        listing += ["consolidated.safetensors", "params.json", "original/consolidated.00.pth"]
        requested: list[list[str]] = []

        class Info:
            sha = "0" * 40
            siblings = tuple(type("Sibling", (), {"rfilename": name}) for name in listing)

        def snapshot_download(repo_id, revision=None, allow_patterns=(), **kwargs):
            requested.append(sorted(allow_patterns))
            return str(model)

        monkeypatch.setattr(hub.HfApi, "model_info", lambda self, *a, **k: Info())
        monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
        result = pytester.runpytest("--spectral-model", "org/tiny")
        result.assert_outcomes(passed=ITEMS)
        shards = sorted(p.name for p in model.glob("model-*.safetensors"))
        assert requested == [
            ["model.safetensors.index.json"],
            sorted(["config.json", "model.safetensors.index.json", *shards]),
        ]
