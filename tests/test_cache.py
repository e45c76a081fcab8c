"""The cache key and the cache file, piece by piece (the engine's use: test_engine, test_plugin).

The key must change with everything the module docstring lists: the file's resolved path and
identity as collected (device, inode, size, mtime and ctime), its header, the tensor's name,
dtype, shape and offsets, the head layout, the precision and the sampled bytes; a file that is
no longer the one collected is never keyed; an entry must come back exactly as stored, or not
at all.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.checkpoints.formats.sources import StoredTensor
from pytest_spectral.compute import cache as cache_module
from pytest_spectral.compute.cache import SpectraCache, entry_key
from pytest_spectral.results import SliceSpectra
from pytest_spectral.untrusted import FileChangedError, FileIdentity

#: the engine's layout tuple: (matrix, scope, heads, kv_heads, head_dim, fused, conv1d)
LAYOUT = ("q", "head", 2, 2, 4, None, False)


@pytest.fixture
def entry(make_checkpoint):
    directory = make_checkpoint(layers=1, heads=2, kv_heads=2, head_dim=4, hidden=16)
    return open_checkpoint(directory).tensors[(0, "q")]


def key(entry, layout=LAYOUT, precision="float64") -> str:
    return entry_key(entry, layout, precision)


def keep_times(path: Path, stat: os.stat_result) -> None:
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def recollected(entry: StoredTensor) -> StoredTensor:
    """The same tensor as a new run collects it, from the file as it is now."""
    return open_checkpoint(entry.file.parent).tensors[(0, "q")]


def at(entry: StoredTensor, path: Path, **fields: object) -> StoredTensor:
    """``entry`` moved to ``path`` (as collected there now), with other ``fields``."""
    return dataclasses.replace(entry, file=path, identity=FileIdentity.of(path.stat()), **fields)


class TestKey:
    def test_same_inputs_same_key(self, entry) -> None:
        first = key(entry)
        assert first == key(dataclasses.replace(entry))
        assert len(first) == 64
        int(first, 16)

    @pytest.mark.parametrize(
        "change",
        [
            {"name": "model.layers.0.self_attn.k_proj.weight"},
            {"dtype": "F16"},
            {"shape": (4, 32)},
            {"offset": 0},
            {"nbytes": 64},
            {"header_sha256": "0" * 64},
        ],
    )
    def test_tensor_fields(self, entry, change) -> None:
        assert key(dataclasses.replace(entry, **change)) != key(entry)

    @pytest.mark.parametrize("field", ["device", "inode", "size", "mtime_ns", "ctime_ns"])
    def test_every_identity_field(self, entry, field, monkeypatch) -> None:
        """Each field of the collected identity, alone (the samples held fixed: a real file
        whose identity differs from the collected one is never read, see below)."""
        monkeypatch.setattr(StoredTensor, "sample_bytes", lambda self: b"fixed")
        identity = entry.identity
        other = dataclasses.replace(identity, **{field: getattr(identity, field) + 1})
        assert key(dataclasses.replace(entry, identity=other)) != key(entry)

    def test_the_sampled_bytes_alone(self, entry, monkeypatch) -> None:
        monkeypatch.setattr(StoredTensor, "sample_bytes", lambda self: b"a")
        before = key(entry)
        monkeypatch.setattr(StoredTensor, "sample_bytes", lambda self: b"b")
        assert key(entry) != before

    @pytest.mark.parametrize("index", range(len(LAYOUT)))
    def test_every_layout_field(self, entry, index: int) -> None:
        other = list(LAYOUT)
        other[index] = {str: "x", int: 3, type(None): "concat", bool: True}[type(LAYOUT[index])]
        assert key(entry, tuple(other)) != key(entry)

    def test_precision(self, entry) -> None:
        assert key(entry, precision="float32") != key(entry)

    def test_another_path_to_the_same_bytes(self, entry, tmp_path) -> None:
        copy = tmp_path / "copy.safetensors"
        shutil.copy2(entry.file, copy)
        assert key(at(entry, copy)) != key(entry)

    def test_a_hard_link_is_another_path(self, entry, tmp_path) -> None:
        """Same inode, size, times and bytes: the resolved path still tells them apart."""
        link = tmp_path / "hardlink.safetensors"
        os.link(entry.file, link)
        original, linked = at(entry, entry.file), at(entry, link)
        assert original.identity == linked.identity
        assert key(linked) != key(original)

    def test_a_symlink_is_keyed_by_its_target(self, entry, tmp_path) -> None:
        link = tmp_path / "link.safetensors"
        link.symlink_to(entry.file)
        assert key(at(entry, link)) == key(entry)

    def test_modification_time(self, entry) -> None:
        """A touched file is no longer the one collected; collected again, it keys apart."""
        before, stat = key(entry), entry.file.stat()
        os.utime(entry.file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        with pytest.raises(FileChangedError, match="changed after collection"):
            key(entry)
        assert key(recollected(entry)) != before

    def test_inode(self, entry, tmp_path) -> None:
        """The file replaced by an identical copy with the same times: another inode."""
        before, stat = key(entry), entry.file.stat()
        copy = tmp_path / "identical"
        shutil.copy2(entry.file, copy)
        os.replace(copy, entry.file)
        keep_times(entry.file, stat)
        assert entry.file.stat().st_ino != stat.st_ino
        with pytest.raises(FileChangedError, match="replaced by another file"):
            key(entry)
        assert key(recollected(entry)) != before

    def test_size(self, entry) -> None:
        """Bytes appended after the tensors, times restored: the size differs."""
        before, stat = key(entry), entry.file.stat()
        with entry.file.open("ab") as handle:
            handle.write(b"\0" * 8)
        keep_times(entry.file, stat)
        with pytest.raises(FileChangedError, match="size"):
            key(entry)
        assert key(recollected(entry)) != before

    def test_a_sampled_byte_rewritten_in_place(self, entry) -> None:
        before, stat = key(entry), entry.file.stat()
        with entry.file.open("r+b") as handle:
            handle.seek(entry.offset + entry.nbytes - 1)
            last = handle.read(1)
            handle.seek(entry.offset + entry.nbytes - 1)
            handle.write(bytes([last[0] ^ 0x01]))
        keep_times(entry.file, stat)
        assert key(recollected(entry)) != before


class TestSamples:
    def test_sixteen_evenly_spaced_blocks_and_the_last_4_kib(self, entry, tmp_path) -> None:
        """A 128 KiB tensor after a 100-byte prefix: blocks at every 8 KiB, then its end."""
        data = bytes(range(256)) * 600  # 153,600 bytes, no two 4 KiB blocks alike
        path = tmp_path / "blob"
        path.write_bytes(data)
        big = at(entry, path, offset=100, nbytes=128 * 1024)
        stride = 8 * 1024
        expected = b"".join(data[100 + i * stride : 100 + i * stride + 4096] for i in range(16))
        expected += data[100 + 128 * 1024 - 4096 : 100 + 128 * 1024]
        assert big.sample_bytes() == expected
        assert len(expected) == 17 * 4096

    def test_a_small_tensor_is_sampled_whole(self, entry) -> None:
        """Under 16 x 4 KiB every byte is in some sample: flipping any one changes them."""
        data = entry.file.read_bytes()
        sample = entry.sample_bytes()
        for position in (0, 1, entry.nbytes // 2, entry.nbytes - 1):
            flipped = bytearray(data)
            flipped[entry.offset + position] ^= 0x01
            entry.file.write_bytes(bytes(flipped))
            assert at(entry, entry.file).sample_bytes() != sample, position
        entry.file.write_bytes(data)
        assert at(entry, entry.file).sample_bytes() == sample

    def test_bytes_outside_the_tensor_are_not_read(self, entry) -> None:
        data = bytearray(entry.file.read_bytes())
        sample = entry.sample_bytes()
        data[entry.offset - 1] ^= 0x01  # the byte before (end of the header)
        data.extend(b"trailing")  # and bytes after it
        entry.file.write_bytes(bytes(data))
        assert at(entry, entry.file).sample_bytes() == sample

    def test_a_tensor_under_16_bytes_is_sampled_alone(self, entry, tmp_path) -> None:
        """8 bytes: 16 samples of stride 1 reach past its end; none reads beyond it."""
        path = tmp_path / "blob"
        data = bytearray(range(200))
        path.write_bytes(bytes(data))
        sample = at(entry, path, offset=100, nbytes=8).sample_bytes()
        assert set(sample) == set(range(100, 108))
        data[108] ^= 0xFF
        path.write_bytes(bytes(data))
        assert at(entry, path, offset=100, nbytes=8).sample_bytes() == sample

    def test_a_torch_save_tensor_is_sampled_at_its_own_bytes(self, entry, tmp_path) -> None:
        """A ``.bin`` file's tensor is sampled where its storage lies in the zip, like a
        safetensors one: its first block is the tensor's own bytes."""
        weight = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)
        directory = tmp_path / "bin"
        directory.mkdir()
        shutil.copy(entry.file.parent / "config.json", directory)
        tensors = {name: t.float() for name, t in load_file(entry.file).items()}
        tensors["model.layers.0.self_attn.q_proj.weight"] = weight
        torch.save(tensors, directory / "pytorch_model.bin")
        stored = open_checkpoint(directory).tensors[(0, "q")]
        assert stored.offset > 0
        assert stored.sample_bytes()[: 8 * 16 * 4] == weight.numpy().tobytes()


def spectra(rows: int = 3) -> SliceSpectra:
    values = np.arange(rows * 4, dtype=np.float64).reshape(rows, 4)[:, ::-1].copy()
    metrics = {"spectral_norm": values[:, 0].copy(), "top_k_ratio(k=2)": np.full(rows, 0.5)}
    return SliceSpectra(values, [0, 2, 0][:rows], ["gram", "svd", "gram"][:rows], metrics)


class TestEntries:
    def test_round_trip(self, tmp_path) -> None:
        cache = SpectraCache(tmp_path / "new" / "dir")
        stored = spectra()
        cache.store("a" * 64, stored)
        loaded = cache.load("a" * 64)
        np.testing.assert_array_equal(loaded.singular_values, stored.singular_values)
        assert (loaded.nonfinite, loaded.methods) == ([0, 2, 0], ["gram", "svd", "gram"])
        assert set(loaded.metrics) == {"spectral_norm", "top_k_ratio(k=2)"}
        np.testing.assert_array_equal(loaded.metrics["spectral_norm"], [3.0, 7.0, 11.0])
        assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["a" * 40 + ".npz"]

    def test_a_circuit_entry_keeps_its_floor(self, tmp_path) -> None:
        """A circuit's per-slice measurement floor is stored, checked and returned with it;
        other entries have none."""
        cache = SpectraCache(tmp_path)
        cache.store("f" * 64, dataclasses.replace(spectra(), floor=np.array([1e-12, 2e-12, 3e-12])))
        loaded = cache.load("f" * 64)
        assert loaded is not None
        np.testing.assert_array_equal(loaded.floor, [1e-12, 2e-12, 3e-12])
        np.testing.assert_array_equal(loaded.singular_values, spectra().singular_values)
        cache.store("a" * 64, spectra())
        assert cache.load("a" * 64).floor is None

    @pytest.mark.parametrize(
        "floor", [[1e-12, 2e-12, 4e-12], [1e-12, 2e-12]], ids=["altered", "one-short"]
    )
    def test_an_entry_with_an_altered_floor_is_removed(self, tmp_path, floor) -> None:
        cache = SpectraCache(tmp_path)
        cache.store("f" * 64, dataclasses.replace(spectra(), floor=np.array([1e-12, 2e-12, 3e-12])))
        path = tmp_path / ("f" * 40 + ".npz")
        with np.load(path) as good:
            members = {n: good[n] for n in good.files}
        np.savez(path, **{**members, "floor": np.asarray(floor)})
        assert cache.load("f" * 64) is None
        assert list(tmp_path.iterdir()) == []

    def test_absent_entry(self, tmp_path) -> None:
        assert SpectraCache(tmp_path).load("b" * 64) is None

    def test_another_key_with_the_same_file_name_is_a_miss(self, tmp_path) -> None:
        """Files are named by the key's first 40 hex digits; the whole key is stored."""
        cache = SpectraCache(tmp_path)
        cache.store("c" * 64, spectra())
        assert cache.load("c" * 40 + "d" * 24) is None
        assert list(tmp_path.iterdir()) == []  # the entry that did not match is removed

    @pytest.mark.parametrize(
        "damage",
        [
            lambda s: dataclasses.replace(s, singular_values=s.singular_values + 1e-12),
            lambda s: dataclasses.replace(s, metrics={**s.metrics, "spectral_norm": np.zeros(3)}),
            lambda s: dataclasses.replace(s, singular_values=s.singular_values[0]),  # 1-D
            lambda s: dataclasses.replace(s, nonfinite=[0, 0]),
            lambda s: dataclasses.replace(s, methods=["gram"]),
        ],
    )
    def test_inconsistent_entries_are_removed(self, tmp_path, damage) -> None:
        """An entry whose parts disagree (checksum, shapes) is not used, and is deleted."""
        cache = SpectraCache(tmp_path)
        cache.store("e" * 64, spectra())
        good = np.load(tmp_path / ("e" * 40 + ".npz"))
        bad = damage(spectra())
        parts = {name: good[name] for name in good.files}
        parts["values"] = bad.singular_values
        parts["nonfinite"] = np.asarray(bad.nonfinite)
        parts["methods"] = np.asarray(bad.methods)
        parts["metric_names"] = np.asarray(list(bad.metrics))
        parts["metrics"] = np.asarray(list(bad.metrics.values()))
        np.savez(tmp_path / ("e" * 40 + ".npz"), **parts)
        assert cache.load("e" * 64) is None
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize(
        "members",
        [
            {"metric_names": np.asarray(["spectral_norm"])},  # a column without a name
            {"metric_names": np.asarray(["spectral_norm", "spectral_norm"])},  # a name twice
            {"metrics": np.asarray([["3", "7", "11"], ["0.5", "0.5", "0.5"]])},  # text
            {"metrics": np.asarray([3.0, 7.0, 11.0, 0.5, 0.5, 0.5])},  # not one row per name
        ],
    )
    def test_metric_columns_that_do_not_match_their_names_are_removed(
        self, tmp_path, members
    ) -> None:
        """The metric columns are one array, their names another: an entry where the two
        disagree is not used, and is deleted."""
        cache = SpectraCache(tmp_path)
        cache.store("e" * 64, spectra())
        good = np.load(tmp_path / ("e" * 40 + ".npz"))
        np.savez(tmp_path / ("e" * 40 + ".npz"), **{**{n: good[n] for n in good.files}, **members})
        assert cache.load("e" * 64) is None
        assert list(tmp_path.iterdir()) == []

    def test_an_unwritable_cache_is_no_cache(self, tmp_path) -> None:
        """A cache directory that cannot be created (a file is in the way): nothing stored,
        nothing raised, the run goes on computing."""
        (tmp_path / "blocked").write_text("a file, not a directory")
        cache = SpectraCache(tmp_path / "blocked" / "spectral")
        cache.store("f" * 64, spectra())
        assert cache.load("f" * 64) is None

    def test_entries_are_never_unpickled(self, tmp_path) -> None:
        """An entry holding a pickled object (a hostile cache) is refused unopened."""
        cache = SpectraCache(tmp_path)
        cache.store("9" * 64, spectra())
        path = tmp_path / ("9" * 40 + ".npz")
        good = np.load(path)
        parts = {name: good[name] for name in good.files}
        parts["values"] = np.array([Unpickled()], dtype=object)
        np.savez(path, **parts)
        assert cache.load("9" * 64) is None
        assert UNPICKLED == []
        assert not path.exists()

    def test_temporary_file_beside_the_entry(self, tmp_path, monkeypatch) -> None:
        """Written beside the entry and renamed: a rename within one directory is atomic."""
        made: list[tuple[object, object]] = []
        original = tempfile.mkstemp

        def spy(*, dir, suffix):
            made.append((Path(dir), suffix))
            return original(dir=dir, suffix=suffix)

        monkeypatch.setattr(cache_module.tempfile, "mkstemp", spy)
        SpectraCache(tmp_path / "c").store("1" * 64, spectra())
        assert made == [(tmp_path / "c", ".tmp")]

    def test_a_failed_rename_leaves_nothing_behind(self, tmp_path, monkeypatch) -> None:
        def refuse(source, target) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(cache_module.os, "replace", refuse)
        cache = SpectraCache(tmp_path)
        cache.store("2" * 64, spectra())
        assert list(tmp_path.iterdir()) == []
        assert cache.load("2" * 64) is None


UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    UNPICKLED.append("unpickled")
    return "x"


class Unpickled:
    def __reduce__(self):
        return (_record_unpickling, ())
