"""Broken and hostile checkpoints: precise errors, no tracebacks, nothing modified, low memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.checkpoints.formats.safetensors import read_header
from pytest_spectral.compute.cache import SpectraCache
from pytest_spectral.compute.spectra import slice_singular_values
from pytest_spectral.errors import CheckpointError
from pytest_spectral.results import SliceSpectra
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)


@pytest.fixture
def sharded(pytester: pytest.Pytester) -> Path:
    tensors = random_llama_weights(SHAPE, seed=5)
    return write_checkpoint(pytester.path / "model", tensors, SHAPE.config(), shards=2)


def first_shard(directory: Path) -> Path:
    return directory / "model-00001-of-00002.safetensors"


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def q_entry_name(header: dict) -> str:
    return next(name for name in header if name.endswith("q_proj.weight"))


def drop_promised_tensor(directory: Path) -> None:
    path = first_shard(directory)
    tensors = load_file(path)
    tensors.pop(attention_name(0, "k"))
    save_file(tensors, path)


def overlap_tensors(directory: Path) -> None:
    def edit(header: dict) -> None:
        names = sorted(
            (n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0]
        )
        a, b = header[names[0]], header[names[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]

    rewrite_header(first_shard(directory), edit)


def broken_symlink_shard(directory: Path) -> None:
    path = first_shard(directory)
    path.unlink()
    path.symlink_to(directory / "gone.safetensors")


def unsupported_dtype(directory: Path) -> None:
    path = first_shard(directory)
    tensors = load_file(path)
    tensors[attention_name(0, "q")] = torch.zeros(32, 32, dtype=torch.int8)
    save_file(tensors, path)


BROKEN_FILES: dict[str, tuple[Callable[[Path], object], str]] = {
    "missing config.json": (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    "config with a head count in quotes": (
        lambda d: (d / "config.json").write_text(
            json.dumps(
                {
                    "model_type": "llama",
                    "hidden_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": "4",
                }
            )
        ),
        "'num_attention_heads' must be a positive integer, got '4'",
    ),
    "config without head counts (LlamaConfig's 32 heads: head_dim 1)": (
        lambda d: (d / "config.json").write_text(
            json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2})
        ),
        "'hidden_size / num_attention_heads' gives 1; a head slice must be at least 2 x 2",
    ),
    "index naming a missing shard": (
        lambda d: first_shard(d).unlink(),
        "shard 'model-00001-of-00002.safetensors'",
    ),
    "shard missing a promised tensor": (
        drop_promised_tensor,
        "'model.layers.0.self_attn.k_proj.weight' promised by",
    ),
    "truncated file": (
        lambda d: first_shard(d).write_bytes(first_shard(d).read_bytes()[:-64]),
        "data section",
    ),
    "header longer than file": (
        lambda d: first_shard(d).write_bytes(struct.pack("<Q", 10**6) + b"{}"),
        "header claims 1000000 bytes",
    ),
    "header not JSON": (
        lambda d: first_shard(d).write_bytes(struct.pack("<Q", 8) + b"not json"),
        "header is not valid JSON",
    ),
    "offsets outside the data": (
        lambda d: rewrite_header(
            first_shard(d), lambda h: h[q_entry_name(h)].update(data_offsets=[10**9, 10**9 + 2048])
        ),
        "lie outside the",
    ),
    "overlapping tensors": (overlap_tensors, "overlap in the data section"),
    "unsupported dtype": (unsupported_dtype, "has dtype I8"),
    "shape disagreeing with config": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "num_key_value_heads": 4})
        ),
        "implies [32, 32]",
    ),
    "zero-byte file": (lambda d: first_shard(d).write_bytes(b""), "file is 0 bytes"),
    "no weights": (lambda d: [p.unlink() for p in d.glob("model*")], "no model.safetensors, "),
    "broken symlink shard": (broken_symlink_shard, "is a broken symlink"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_file_is_a_usage_error_naming_it(pytester, sharded, case: str) -> None:
    damage, message = BROKEN_FILES[case]
    damage(sharded)
    result = pytester.runpytest(f"--spectral-model={sharded}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    output = result.stdout.str() + result.stderr.str()
    assert message in output
    assert "Traceback" not in output
    assert "INTERNALERROR" not in output


def test_model_path_that_is_a_broken_symlink(pytester) -> None:
    link = pytester.path / "link"
    link.symlink_to(pytester.path / "nowhere")
    result = pytester.runpytest(f"--spectral-model={link}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*link: is a broken symlink (to *nowhere)"])


def test_permission_denied_names_the_file(sharded, monkeypatch) -> None:
    target = first_shard(sharded)
    original = os.open

    def guarded(path: object, *args: object, **kwargs: object) -> int:
        if Path(path) == target:  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", str(path))
        return original(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", guarded)
    with pytest.raises(
        CheckpointError, match=r"00001-of-00002.safetensors: cannot read: Permission"
    ):
        open_checkpoint(sharded)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_for_real(sharded) -> None:
    first_shard(sharded).chmod(0)
    with pytest.raises(CheckpointError, match="Permission denied"):
        open_checkpoint(sharded)


class TestHostileHeaders:
    def test_absurd_header_length_is_refused_before_reading(self, tmp_path, monkeypatch) -> None:
        path = tmp_path / "huge.safetensors"
        with path.open("wb") as handle:  # a sparse 300 MB file: nothing is really written
            handle.write(struct.pack("<Q", 250 * 2**20))
            handle.truncate(300 * 2**20)
        bytes_read: list[int] = []
        original = os.preadv

        def counting_preadv(descriptor: int, buffers: list, offset: int) -> int:
            count = original(descriptor, buffers, offset)
            bytes_read.append(count)
            return count

        monkeypatch.setattr(os, "preadv", counting_preadv)
        with pytest.raises(CheckpointError, match="over the 16 MiB any real safetensors header"):
            read_header(path)
        assert bytes_read == [8]  # the length prefix, nothing more

    def test_huge_shapes_are_checked_against_the_bytes(self, tmp_path) -> None:
        header = json.dumps(
            {"w": {"dtype": "BF16", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}
        ).encode()
        path = tmp_path / "claims.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
        with pytest.raises(CheckpointError, match="16 bytes stored but shape"):
            read_header(path)

    @pytest.mark.parametrize(
        "entry",
        [
            {"dtype": "BF16", "shape": [-1, 2], "data_offsets": [0, 4]},
            {"dtype": "BF16", "shape": "2x2", "data_offsets": [0, 8]},
            {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 0]},
            {"dtype": 7, "shape": [2, 2], "data_offsets": [0, 8]},
            ["not", "an", "object"],
        ],
    )
    def test_malformed_entries(self, tmp_path, entry) -> None:
        header = json.dumps({"w": entry}).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
        with pytest.raises(CheckpointError, match="tensor 'w'"):
            read_header(path)


class TestBrokenWeights:
    def test_denormal_and_huge_weights_do_not_crash(self) -> None:
        blocks = torch.randn(3, 8, 64)
        blocks[0] *= 1e-39  # float32 denormals
        blocks[1] = blocks[1].sign() * 3.0e38  # near float32's maximum
        blocks[2] = 0
        result = slice_singular_values(blocks)
        assert np.isfinite(result.singular_values).all()
        assert result.nonfinite == [0, 0, 0]
        reference = np.linalg.svd(blocks[1].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(result.singular_values[1], reference, rtol=1e-9)

    def test_inf_and_nan_counts(self) -> None:
        blocks = torch.randn(2, 4, 16, dtype=torch.float16)
        blocks[0, 0, :3] = float("inf")
        blocks[0, 1, 0] = float("-inf")
        blocks[0, 2, 0] = float("nan")
        assert slice_singular_values(blocks).nonfinite == [5, 0]


def digests(directory: Path) -> dict[str, tuple[str, int, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(directory.iterdir())
    }


def test_checkpoint_files_are_never_modified(pytester, sharded) -> None:
    before = digests(sharded)
    rules = pytester.path / "rules.toml"
    rules.write_text('[[rules]]\nmetric = "stable_rank"\nmin = 100\n')
    args = (f"--spectral-model={sharded}", f"--spectral-thresholds={rules}")
    pytester.runpytest(*args).assert_outcomes(failed=32)  # fills the cache
    pytester.runpytest(*args).assert_outcomes(failed=32)  # reads it
    pytester.runpytest_subprocess(*args, "-n", "2", "--spectral-no-cache").assert_outcomes(
        failed=32
    )
    assert digests(sharded) == before


def test_concurrent_cache_writers_never_expose_half_entries(tmp_path) -> None:
    cache = SpectraCache(tmp_path / "cache")
    values = np.random.default_rng(0).random((64, 128))
    spectra = SliceSpectra(values, [0] * 64, ["gram"] * 64)
    seen: list[object] = []

    def work() -> None:
        for _ in range(20):
            cache.store("k" * 64, spectra)
            loaded = cache.load("k" * 64)
            seen.append(None if loaded is None else loaded.singular_values.tobytes())

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen
    assert all(s == values.tobytes() for s in seen)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]


MEMORY_PROBE = """
import json, sys
from pathlib import Path
from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS
import torch

def peak_mb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024

checkpoint = open_checkpoint(Path(sys.argv[1]))
engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS, threads=1)
for matrix in ("q", "k", "v", "o"):  # warm up torch, LAPACK and the allocator with a layer:
    engine.head(0, matrix, 0)         # each matrix's kernels and buffers are first made here
before = peak_mb()
for layer in range(checkpoint.geometry.layers):
    for head in range(checkpoint.geometry.heads):
        for matrix in ("q", "k", "v", "o"):
            engine.head(layer, matrix, head)
print(json.dumps({"growth_mb": peak_mb() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_stays_near_one_layer(tmp_path) -> None:
    shape = LlamaShape(layers=6, heads=16, kv_heads=16, head_dim=128, hidden=2048, mlp=False)
    directory = write_checkpoint(
        tmp_path / "big", random_llama_weights(shape, attention_only=True), shape.config()
    )
    layer_mb = 4 * 2048 * 2048 * 2 / 2**20  # one layer's Q/K/V/O in bf16: 32 MB
    total_mb = layer_mb * shape.layers  # 192 MB: what reading everything would cost
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    growth = json.loads(done.stdout)["growth_mb"]
    assert growth < 2 * layer_mb, f"peak grew {growth:.0f} MB; the whole model is {total_mb:.0f} MB"


@pytest.fixture
def checkpoint_on_another_tree() -> Path:
    """A checkpoint whose only common ancestor with the test directory is '/'."""
    import tempfile

    base = Path("/var/tmp")
    if not base.is_dir() or str(Path.cwd()).startswith(str(base)):
        pytest.skip("needs /var/tmp outside the test directory")
    directory = Path(tempfile.mkdtemp(dir=base)) / "model"
    write_checkpoint(directory, random_llama_weights(SHAPE, seed=2), SHAPE.config())
    yield directory
    shutil.rmtree(directory.parent)


def test_pytest_cache_is_never_written_into_the_checkpoint(
    pytester, checkpoint_on_another_tree
) -> None:
    model = str(checkpoint_on_another_tree)
    result = pytester.runpytest("--spectral-model", model)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"  *pytest --spectral-model={model} *"])  # or python -m pytest
    pytester.runpytest(f"--spectral-model={model}").assert_outcomes(passed=32)
    assert sorted(p.name for p in checkpoint_on_another_tree.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
