"""The engine around the decomposition: planning, prefetch, cache, devices and threads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pytest_spectral.checkpoints.checkpoint import MATRICES, open_checkpoint
from pytest_spectral.compute import device, spectra
from pytest_spectral.compute.cache import SpectraCache, entry_key
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.errors import DeviceError
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS
from pytest_spectral.testing.synthetic import conditioned_slices
from pytest_spectral.untrusted import FileChangedError


@pytest.fixture
def checkpoint(make_checkpoint):
    return open_checkpoint(make_checkpoint(layers=3, heads=4, kv_heads=2, head_dim=8, hidden=32))


@pytest.fixture
def decompositions(monkeypatch) -> list[tuple[int, ...]]:
    """Records the shape of every batch the engine decomposes."""
    seen: list[tuple[int, ...]] = []
    original = spectra.start_slices

    def spy(blocks: torch.Tensor, **kwargs: object) -> spectra.PendingSpectra:
        seen.append(tuple(blocks.shape))
        return original(blocks, **kwargs)

    monkeypatch.setattr(spectra, "start_slices", spy)
    return seen


def all_values(engine: SpectraEngine, layers: range) -> list[list[float]]:
    return [
        engine.head(layer, matrix, head).singular_values
        for layer in layers
        for head in range(4)
        for matrix in MATRICES
    ]


class TestPlanAndPrefetch:
    def test_only_planned_matrices_are_read(self, checkpoint, decompositions) -> None:
        engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
        engine.plan([(1, "q", "head"), (1, "k", "head")])
        engine.head(1, "q", 0)
        engine.head(1, "k", 3)
        assert decompositions == [(4, 8, 32), (2, 8, 32)]

    def test_prefetch_computes_the_next_layer_ahead(self, checkpoint, decompositions) -> None:
        engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS, prefetch=True)
        engine.plan([(layer, m, "head") for layer in (0, 2) for m in MATRICES])
        engine.head(0, "q", 0)
        engine._futures[2].result()  # layer 2 is being computed before anyone asks for it
        assert len(decompositions) == 8
        engine.close()

    def test_prefetch_keeps_two_layers_ahead(self, checkpoint, decompositions) -> None:
        engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS, prefetch=True)
        engine.plan([(layer, m, "head") for layer in range(3) for m in MATRICES])
        engine.head(0, "q", 0)
        assert set(engine._futures) == {0, 1, 2}  # layers 1 and 2 queued as 0 is served
        engine._futures[2].result()
        assert len(decompositions) == 12
        engine.head(1, "q", 0)
        assert set(engine._futures) == {1, 2}  # layer 0 released
        engine.close()

    def test_prefetch_gives_the_same_values(self, checkpoint) -> None:
        plan = [(layer, m, "head") for layer in range(3) for m in MATRICES]
        plain = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
        ahead = SpectraEngine(checkpoint, DEFAULT_REQUESTS, prefetch=True)
        plain.plan(plan)
        ahead.plan(plan)
        assert all_values(plain, range(3)) == all_values(ahead, range(3))
        ahead.close()

    def test_old_layers_are_released(self, checkpoint) -> None:
        engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
        engine.plan([(layer, m, "head") for layer in range(3) for m in MATRICES])
        for layer in range(3):
            engine.head(layer, "q", 0)
        assert set(engine._futures) == {2}


def weight_of(checkpoint, layer: int, matrix: str) -> torch.Tensor:
    """The stored weight, read with the safetensors library (not the plugin's reader)."""
    entry = checkpoint.tensors[(layer, matrix)]
    with safe_open(str(entry.file), framework="pt") as handle:
        return handle.get_tensor(entry.name)


def flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


class TestCache:
    def test_second_engine_reads_from_cache(self, checkpoint, tmp_path, decompositions) -> None:
        cache = SpectraCache(tmp_path / "cache")
        first = all_values(SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache), range(3))
        computed = len(decompositions)
        second = all_values(SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache), range(3))
        assert first == second
        assert len(decompositions) == computed == 12

    def test_rewritten_file_is_recomputed(self, make_checkpoint, tmp_path) -> None:
        directory = make_checkpoint(layers=1, heads=2, kv_heads=2, head_dim=4, hidden=16, seed=1)
        cache = SpectraCache(tmp_path / "cache")
        before = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS, cache=cache)
        old = before.head(0, "q", 0).singular_values
        replacement = make_checkpoint(layers=1, heads=2, kv_heads=2, head_dim=4, hidden=16, seed=2)
        (replacement / "model.safetensors").replace(directory / "model.safetensors")
        after = SpectraEngine(open_checkpoint(directory), DEFAULT_REQUESTS, cache=cache)
        assert after.head(0, "q", 0).singular_values != old

    def test_in_place_edit_with_restored_mtime_is_detected(self, make_checkpoint) -> None:
        directory = make_checkpoint(layers=1, heads=4, kv_heads=4, head_dim=64, hidden=512)
        entry = open_checkpoint(directory).tensors[(0, "q")]  # 256 KiB: not sampled whole
        layout = ("q", 4, 64)
        key = entry_key(entry, layout, "float64")
        stat = entry.file.stat()
        time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
        flipped = entry.offset + entry.nbytes // 32  # a byte the key's samples do not cover
        assert not any(
            start <= flipped - entry.offset < start + 4096
            for start in [i * (entry.nbytes // 16) for i in range(16)] + [entry.nbytes - 4096]
        )
        with entry.file.open("r+b") as handle:
            handle.seek(flipped)
            first = handle.read(1)
            handle.seek(flipped)
            handle.write(bytes([first[0] ^ 0xFF]))
        os.utime(entry.file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert entry.file.stat().st_mtime_ns == stat.st_mtime_ns
        assert entry.file.stat().st_size == stat.st_size
        reopened = open_checkpoint(entry.file.parent).tensors[(0, "q")]
        assert entry_key(reopened, layout, "float64") != key  # the ctime moved

    def test_file_changed_since_collection_is_not_keyed(self, checkpoint) -> None:
        entry = checkpoint.tensors[(0, "q")]
        time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
        entry.file.write_bytes(entry.file.read_bytes())  # same bytes, new mtime and ctime
        with pytest.raises(FileChangedError, match="changed after collection"):
            entry_key(entry, ("q", 4, 8), "float64")

    def test_sampled_byte_edited_with_restored_mtime_is_recomputed(
        self, checkpoint, tmp_path
    ) -> None:
        """A sampled byte changed, with size, inode and mtime as before: recomputed."""
        cache = SpectraCache(tmp_path / "cache")
        old = SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache).head(0, "q", 0)
        entry = checkpoint.tensors[(0, "q")]
        stat = entry.file.stat()
        with entry.file.open("r+b") as handle:  # the first weight becomes 8.0 (bf16 0x4100)
            handle.seek(entry.offset)
            handle.write(bytes([0x00, 0x41]))
        os.utime(entry.file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert entry.file.stat().st_mtime_ns == stat.st_mtime_ns
        reopened = open_checkpoint(entry.file.parent)
        new = SpectraEngine(reopened, DEFAULT_REQUESTS, cache=cache).head(0, "q", 0)
        edited = weight_of(reopened, 0, "q")[:8]  # query head 0: rows 0-7
        assert new.singular_values != old.singular_values
        np.testing.assert_allclose(new.singular_values, reference_values(edited), rtol=1e-9)

    def test_precision_is_part_of_the_key(self, checkpoint, tmp_path) -> None:
        cache = SpectraCache(tmp_path / "cache")
        SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache).head(0, "q", 0)
        single = SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache, precision="float32")
        assert single.head(0, "q", 0).method == "svd32"
        double = SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache)
        assert double.head(0, "q", 0).method == "gram"

    def test_heads_and_whole_matrix_of_one_tensor_are_cached_apart(
        self, checkpoint, tmp_path
    ) -> None:
        cache = SpectraCache(tmp_path / "cache")
        plan = [(0, m, scope) for m in ("q", "k") for scope in ("head", "matrix")]
        for _ in range(2):  # computed, then served from the cache
            engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache)
            engine.plan(plan)
            for matrix in ("q", "k"):
                weight = weight_of(checkpoint, 0, matrix)
                whole = engine.whole(0, matrix).singular_values
                np.testing.assert_allclose(whole, reference_values(weight), rtol=1e-9)
                head = engine.head(0, matrix, 3).singular_values  # k: K/V head 1, rows 8-15
                rows = weight[24:32] if matrix == "q" else weight[8:16]
                np.testing.assert_allclose(head, reference_values(rows), rtol=1e-9)
        assert len(list((tmp_path / "cache").glob("*.npz"))) == 4

    @pytest.mark.parametrize(
        "damage",
        [
            lambda p: p.write_bytes(p.read_bytes()[:-40]),  # truncated
            lambda p: p.write_bytes(b"not a zip file"),  # garbage
            lambda p: p.write_bytes(flip_middle_byte(p.read_bytes())),  # one bit of rot
        ],
    )
    def test_damaged_entries_are_recomputed(self, checkpoint, tmp_path, damage) -> None:
        cache = SpectraCache(tmp_path / "cache")
        reference = all_values(SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache), range(1))
        for path in (tmp_path / "cache").glob("*.npz"):
            damage(path)
        again = all_values(SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache), range(1))
        assert again == reference

    def test_no_temporary_files_are_left(self, checkpoint, tmp_path) -> None:
        cache = SpectraCache(tmp_path / "cache")
        all_values(SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache), range(3))
        names = [p.name for p in (tmp_path / "cache").iterdir()]
        assert len(names) == 12
        assert all(name.endswith(".npz") for name in names)


class TestDevicesAndThreads:
    def test_cpu_needs_no_torch_question(self) -> None:
        assert device.resolve_device("cpu", "float64") == "cpu"

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    def test_absent_cuda_is_a_clear_error(self) -> None:
        with pytest.raises(DeviceError, match=r"CUDA is not available here \(available: cpu"):
            device.resolve_device("cuda:1", "float64")
        assert device.resolve_device("auto", "float64") == "cpu"

    def test_mps_refuses_float64(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        with pytest.raises(DeviceError, match="MPS has no float64"):
            device.resolve_device("mps", "float64")

    def test_unknown_device(self) -> None:
        with pytest.raises(DeviceError, match="expected auto, cpu, cuda, cuda:N or mps"):
            device.resolve_device("tpu", "float64")

    def test_threads_are_divided_among_xdist_workers(self, monkeypatch) -> None:
        cores = len(os.sched_getaffinity(0))
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "1")
        assert device.default_threads() == cores
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(cores * 2))
        assert device.default_threads() == 1

    def test_cuda_worker_gets_gpu_by_index(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
        assert device.resolve_device("cuda", "float64") == "cuda:1"
        with pytest.raises(DeviceError, match="no such GPU"):
            device.resolve_device("cuda:2", "float64")


def reference_values(blocks: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(blocks.to(torch.float64).numpy(), compute_uv=False)


def test_float32_precision_is_about_1e_6(checkpoint) -> None:
    weight = torch.randn(4, 8, 32)
    result = spectra.slice_singular_values(weight, dtype=torch.float32)
    assert result.methods == ["svd32"] * 4
    np.testing.assert_allclose(result.singular_values, reference_values(weight), rtol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("kappa", "route"), [(10.0, "gram"), (1e4, "cholqr2"), (1e6, "cholqr2")])
def test_cuda_matches_numpy(kappa: float, route: str) -> None:
    """The batched device route against numpy, on rotated (not graded) ill-conditioned slices."""
    generator = torch.Generator().manual_seed(int(kappa))
    blocks = conditioned_slices(16, 128, 4096, (kappa, kappa), generator, dtype=torch.float64)
    for batch in (blocks, blocks.mT.contiguous()):  # Q-like and O-like orientations
        result = spectra.slice_singular_values(batch, device="cuda")
        assert result.methods == [route] * 16
        np.testing.assert_allclose(result.singular_values, reference_values(batch), rtol=1e-9)


def test_engine_on_a_path_without_cache_dir(tmp_path: Path, checkpoint) -> None:
    cache = SpectraCache(tmp_path / "not" / "yet" / "there")
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS, cache=cache)
    assert engine.head(0, "v", 3).method == "gram"
