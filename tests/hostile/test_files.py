"""Hostile files: not what they claim, small but exhausting, changing under the run, unread.

Every case runs pytest in a process of its own (the ``hostile`` fixture, see conftest.py) and
must end in a usage error naming the file and key, or in failing items, within 10 s and
500 MB, with no traceback, and with nothing written but pytest's cache and the report paths.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import socket
import struct
import textwrap
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.checkpoints.formats import huggingface as huggingface_format
from pytest_spectral.errors import CheckpointError
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=64)
ITEMS = SHAPE.layers * SHAPE.heads * 4
FIRST_SHARD = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def write_model(root: Path, name: str = "model", *, shards: int = 1, seed: int = 3) -> Path:
    return write_checkpoint(
        root / name, random_llama_weights(SHAPE, seed=seed), SHAPE.config(), shards=shards
    )


def write_torch_model(root: Path, name: str = "binary") -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(SHAPE.config()))
    tensors = {n: t.bfloat16() for n, t in random_llama_weights(SHAPE, seed=3).items()}
    torch.save(tensors, directory / "pytorch_model.bin")
    return directory


def model_arg(path: Path) -> str:
    return f"--spectral-model={path}"


# --- 2. Files that are not what they claim ---------------------------------------------------


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_dev_zero_link(path: Path) -> None:
    path.symlink_to("/dev/zero")


def make_directory(path: Path) -> None:
    path.mkdir()


def make_symlink_loop(path: Path) -> None:
    path.symlink_to(path.name)


def make_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(os.path.relpath(path))  # relative: socket paths are limited to 108 bytes


def make_broken_symlink(path: Path) -> None:
    path.symlink_to(path.name + ".gone")


NOT_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (make_fifo, "is a named pipe (FIFO), not a regular file"),
    "/dev/zero": (make_dev_zero_link, "is a character device (a symlink to /dev/zero)"),
    "directory": (make_directory, "is a directory, not a regular file"),
    "symlink loop": (make_symlink_loop, "is a symlink loop"),
    "socket": (make_socket, "is a socket, not a regular file"),
    "broken symlink": (make_broken_symlink, "is a broken symlink"),
}


def in_sharded(name: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def place(root: Path) -> tuple[Path, list[str]]:
        model = write_model(root, shards=2)
        return model / name, [model_arg(model)]

    return place


def in_single(root: Path) -> tuple[Path, list[str]]:
    model = write_model(root)
    return model / "model.safetensors", [model_arg(model)]


def in_torch(root: Path) -> tuple[Path, list[str]]:
    model = write_torch_model(root)
    return model / "pytorch_model.bin", [model_arg(model)]


def as_model_path(root: Path) -> tuple[Path, list[str]]:
    model = write_model(root)
    return root / "weights.safetensors", [
        model_arg(root / "weights.safetensors"),
        f"--spectral-config={model / 'config.json'}",
    ]


def as_option(option: str, name: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def place(root: Path) -> tuple[Path, list[str]]:
        model = write_model(root)
        if option == "--spectral-config":
            model = model / "model.safetensors"
        return root / name, [model_arg(model), f"{option}={root / name}"]

    return place


#: Where a hostile non-file can sit: every file the plugin opens.
TARGETS: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {
    "config.json": in_sharded("config.json"),
    "index": in_sharded(INDEX),
    "shard": in_sharded(FIRST_SHARD),
    "model.safetensors": in_single,
    "pytorch_model.bin": in_torch,
    "model path": as_model_path,
    "--spectral-config": as_option("--spectral-config", "config-elsewhere.json"),
    "rules": as_option("--spectral-thresholds", "rules.toml"),
    "baseline": as_option("--spectral-baseline", "good.json"),
    "architecture": as_option("--spectral-architecture", "arch.toml"),
}
#: FIFOs and /dev/zero (the inputs that hang or never end) everywhere; the rest at a few places.
CASES = [(target, thing) for target in TARGETS for thing in ("fifo", "/dev/zero")] + [
    (target, thing)
    for target in ("config.json", "shard")
    for thing in ("directory", "symlink loop", "socket", "broken symlink")
]


@pytest.mark.parametrize(("target", "thing"), CASES)
def test_only_regular_files_are_read(pytester, hostile, target: str, thing: str) -> None:
    path, args = TARGETS[target](pytester.path)
    path.unlink(missing_ok=True)
    make, says = NOT_FILES[thing]
    make(path)
    hostile.refused(*args, naming=[path.name, says])


def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    (directory / INDEX).write_text(json.dumps({"weight_map": weight_map}))


def remap_first_shard(directory: Path, spelling: str) -> None:
    """Make the index name the first shard's tensors as ``spelling``."""
    index = json.loads((directory / INDEX).read_text())["weight_map"]
    write_index(directory, {n: spelling if s == FIRST_SHARD else s for n, s in index.items()})


class TestShardsStayInside:
    def test_index_naming_a_sibling_checkpoint(self, pytester, hostile) -> None:
        model = write_model(pytester.path, shards=2)
        write_model(pytester.path, "sibling", shards=2, seed=8)
        remap_first_shard(model, f"../sibling/{FIRST_SHARD}")
        hostile.refused(
            model_arg(model),
            naming=[INDEX, f"shard '../sibling/{FIRST_SHARD}'", "leaves the checkpoint"],
        )

    def test_dot_dot_hidden_inside_a_path(self, pytester, hostile) -> None:
        model = write_model(pytester.path, shards=2)
        write_model(pytester.path, "sibling", shards=2, seed=8)
        (model / "sub").mkdir()
        remap_first_shard(model, f"sub/../../sibling/{FIRST_SHARD}")
        hostile.refused(model_arg(model), naming=[INDEX, "leaves the checkpoint"])

    def test_absolute_shard_path(self, pytester, hostile) -> None:
        model = write_model(pytester.path, shards=2)
        elsewhere = write_model(pytester.path, "elsewhere", shards=2, seed=8)
        remap_first_shard(model, str(elsewhere / FIRST_SHARD))
        hostile.refused(
            model_arg(model), "--spectral-report=r.json", naming=[INDEX, "is an absolute path"]
        )

    def test_symlinked_shard_leading_outside(self, pytester, hostile) -> None:
        model = write_model(pytester.path, shards=2)
        elsewhere = write_model(pytester.path, "elsewhere", shards=2, seed=8)
        (model / FIRST_SHARD).unlink()
        (model / FIRST_SHARD).symlink_to(elsewhere / FIRST_SHARD)
        hostile.refused(model_arg(model), naming=[FIRST_SHARD, "outside the checkpoint directory"])

    def test_symlinked_single_file_leading_outside(self, pytester, hostile) -> None:
        model = write_model(pytester.path)
        elsewhere = write_model(pytester.path, "elsewhere", seed=8)
        (model / "model.safetensors").unlink()
        (model / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
        hostile.refused(model_arg(model), naming=["outside the checkpoint directory"])

    def test_nul_in_a_shard_name(self, pytester, hostile) -> None:
        model = write_model(pytester.path, shards=2)
        remap_first_shard(model, "model\0.safetensors")
        hostile.refused(model_arg(model), naming=[INDEX, "is not a file name"])

    def test_shards_in_a_subfolder_and_hub_blobs_are_read(self, pytester, hostile) -> None:
        """A hub snapshot's files are symlinks into its repository's blobs/: allowed."""
        source = write_model(pytester.path, "source", shards=2)
        repo = pytester.path / "hub" / "models--org--tiny"
        snapshot = repo / "snapshots" / ("1" * 40)
        (snapshot / "sub").mkdir(parents=True)
        (repo / "blobs").mkdir()
        for number, file in enumerate(sorted(source.iterdir())):
            (repo / "blobs" / f"blob{number}").write_bytes(file.read_bytes())
            link = snapshot / ("sub" if file.name == FIRST_SHARD else "") / file.name
            link.symlink_to(os.path.relpath(repo / "blobs" / f"blob{number}", link.parent))
        (snapshot / INDEX).unlink()
        write_index(
            snapshot,
            {
                n: f"sub/{s}" if s == FIRST_SHARD else s
                for n, s in json.loads((source / INDEX).read_text())["weight_map"].items()
            },
        )
        hostile.passes(model_arg(snapshot), items=ITEMS)


# --- 3. Small inputs that exhaust time or memory ---------------------------------------------


def pad_header(path: Path, mib: float) -> None:
    """Rewrite a safetensors file with ``mib`` MiB of metadata in its header."""
    save_file(load_file(path), path, metadata={"pad": "x" * int(mib * 2**20)})


class TestHeadersOnce:
    SPELLINGS = (
        FIRST_SHARD,
        f"./{FIRST_SHARD}",
        f".//{FIRST_SHARD}",
        f"././{FIRST_SHARD}",
        "hard-link.safetensors",
        "soft-link.safetensors",
    )

    def spell_first_shard_six_ways(self, model: Path) -> None:
        os.link(model / FIRST_SHARD, model / "hard-link.safetensors")
        (model / "soft-link.safetensors").symlink_to(FIRST_SHARD)
        index = json.loads((model / INDEX).read_text())["weight_map"]
        first = [n for n, s in index.items() if s == FIRST_SHARD]
        for number, name in enumerate(first):
            index[name] = self.SPELLINGS[number % len(self.SPELLINGS)]
        write_index(model, index)

    def test_each_physical_file_is_parsed_once(self, pytester, monkeypatch) -> None:
        model = write_model(pytester.path, shards=2)
        self.spell_first_shard_six_ways(model)
        parsed: list[Path] = []
        original = huggingface_format.read_header

        def counting(path: Path, *args: object):
            parsed.append(path)
            return original(path, *args)

        monkeypatch.setattr(huggingface_format, "read_header", counting)
        checkpoint = open_checkpoint(model)
        assert len(parsed) == 2
        assert len(checkpoint.files) == 2

    def test_six_spellings_of_a_12_mib_header(self, pytester, hostile) -> None:
        """Six parses would exceed the 32 MiB budget; one fits."""
        model = write_model(pytester.path, shards=2)
        pad_header(model / FIRST_SHARD, 12)
        self.spell_first_shard_six_ways(model)
        outcome = hostile(model_arg(model))
        assert f"{ITEMS} passed" in outcome.output, outcome.output

    def test_headers_over_the_total_budget(self, pytester, hostile) -> None:
        model = write_model(pytester.path, shards=3)
        for shard in sorted(model.glob("*.safetensors")):
            pad_header(shard, 12)
        hostile.refused(
            model_arg(model),
            naming=["model-00003-of-00003", "budget for all of the checkpoint's headers"],
        )

    def test_one_header_over_16_mib(self, pytester, hostile) -> None:
        model = write_model(pytester.path)
        pad_header(model / "model.safetensors", 16.5)
        hostile.refused(model_arg(model), naming=["model.safetensors", "over the 16 MiB"])

    def test_16_mib_of_tiny_junk_entries(self, pytester, hostile) -> None:
        """The most a header may hold, as 270,000 entries: parsed within the limits."""
        model = write_model(pytester.path)
        path = model / "model.safetensors"
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        entry = {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}
        size = len(json.dumps(header, separators=(",", ":")))
        per_entry = len(json.dumps({"junk.000000": entry}, separators=(",", ":")))
        for number in range((16 * 2**20 - size) // per_entry - 1):
            header[f"junk.{number:06d}"] = entry
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        assert 15 * 2**20 < len(raw) <= 16 * 2**20
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
        outcome = hostile(model_arg(model))
        assert f"{ITEMS} passed" in outcome.output, outcome.output


DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_TOML = "x = " + "[" * 100_000 + "]" * 100_000 + "\n"


class TestDeepAndLargeTextInputs:
    @pytest.mark.parametrize(
        ("target", "text"),
        [
            ("config.json", DEEP_JSON),
            (
                "index",
                json.dumps({"weight_map": {}, "metadata": 0})[:-1] + ', "x": ' + DEEP_JSON + "}",
            ),
            ("baseline", DEEP_JSON),
            ("rules", DEEP_TOML),
            ("architecture", DEEP_TOML),
        ],
    )
    def test_100000_deep_nesting(self, pytester, hostile, target: str, text: str) -> None:
        path, args = TARGETS[target](pytester.path)
        path.write_text(text)
        hostile.refused(*args, naming=[path.name, "nested too deeply"])

    def test_100_deep_nesting_is_refused_after_parsing(self, pytester, hostile) -> None:
        path, args = TARGETS["config.json"](pytester.path)
        config = json.loads(path.read_text())
        config["rope_scaling"] = json.loads("[" * 100 + "]" * 100)
        path.write_text(json.dumps(config))
        hostile.refused(*args, naming=["config.json", "nests more than 64 levels"])

    def test_header_nested_100000_deep(self, pytester, hostile) -> None:
        model = write_model(pytester.path)
        raw = ('{"a":' + DEEP_JSON + "}").encode()
        (model / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        hostile.refused(model_arg(model), naming=["model.safetensors", "nested too deeply"])

    @pytest.mark.parametrize(
        ("target", "mib", "cap"),
        [
            ("config.json", 5, "over the 4 MiB cap for this config"),
            ("index", 17, "over the 16 MiB cap for this weight index"),
            ("rules", 2, "over the 1 MiB cap for this rules file"),
            ("architecture", 2, "over the 1 MiB cap for this architecture description"),
            ("baseline", 1025, "over the 1024 MiB cap for this baseline report"),
        ],
    )
    def test_oversized_text_refused_unread(
        self, pytester, hostile, target: str, mib: int, cap: str
    ) -> None:
        path, args = TARGETS[target](pytester.path)
        with path.open("wb") as handle:  # sparse: nothing is really written
            handle.truncate(mib * 2**20)
        hostile.refused(*args, naming=[path.name, cap])


class Reduce:
    """Pickles as a call of ``function(*args)``, the way a hostile pickle is written."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


class StorageRef:
    """Pickles as torch.save's persistent id of a storage record."""

    def __init__(self, key: str, storage_class: object, numel: int) -> None:
        self.key, self.storage_class, self.numel = key, storage_class, numel


class StatePickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, StorageRef):
            return ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
        return None


def pickled(state: object, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    StatePickler(buffer, protocol=protocol).dump(state)
    return buffer.getvalue()


def tensor(storage: StorageRef, shape: tuple[int, ...], stride: tuple[int, ...]) -> Reduce:
    """Pickles as torch.save writes a tensor: ``_rebuild_tensor_v2`` over a storage."""
    hooks = collections.OrderedDict()
    return Reduce(torch._utils._rebuild_tensor_v2, storage, 0, shape, stride, False, hooks)


def torch_archive(
    path: Path,
    data_pkl: bytes,
    records: dict[str, bytes] | None = None,
    *,
    compression: int = zipfile.ZIP_STORED,
    byteorder: bytes = b"little",
) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", byteorder)
        for name, data in (records or {}).items():
            archive.writestr(f"archive/data/{name}", data)


def bin_model(root: Path) -> Path:
    directory = root / "binary"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(SHAPE.config()))
    return directory


GIGABYTE_ALLOCATIONS = {f"w{i}": Reduce(bytearray, 10**9) for i in range(4)}
PAYLOADS: dict[str, tuple[bytes, str]] = {
    "bytearray(10**9) x 4 (the 1.4 KB example)": (
        pickled(GIGABYTE_ALLOCATIONS),
        "its pickle names __builtin__.bytearray",
    ),
    "bytearray, protocol 4": (pickled(GIGABYTE_ALLOCATIONS, 4), "names builtins.bytearray"),
    # a set (as protocol 2 writes one) of what the pickle holds is bounded by the pickle
    "set of ten numbers": (pickled({"w": Reduce(set, list(range(10)))}), "holds no tensors"),
    "set of a billion numbers": (
        pickled({"w": Reduce(set, range(10**9))}),
        "names __builtin__.xrange",  # range, as protocol 2 spells it
    ),
    "frozenset": (pickled({"w": Reduce(frozenset, ["a", "b"])}), "holds no tensors"),
    "torch.Size of a billion": (pickled({"w": Reduce(torch.Size, (10**9,))}), "holds no tensors"),
    "set from a number": (pickled({"w": Reduce(set, 10**9)}), "not a state dict of tensors"),
    "Counter": (pickled({"w": Reduce(collections.Counter, "ab")}), "names collections.Counter"),
    "complex": (pickled({"w": Reduce(complex, 1, 2)}), "names __builtin__.complex"),
    "os.system": (pickled({"w": Reduce(os.system, "touch pwned")}), "names posix.system"),
    "eval": (pickled({"w": Reduce(eval, "1")}), "names __builtin__.eval"),
    "a torch function outside the allowlist": (
        pickled({"w": Reduce(torch._utils._rebuild_device_tensor_from_numpy, 1, 2, 3)}),
        "names torch._utils._rebuild_device_tensor_from_numpy",
    ),
    "an extension code": (b"\x80\x02\x82\x01.", "not a state dict of tensors"),
    "a list, not a dict": (pickled([1, 2]), "expected a dict of tensors, got list"),
    "2 MiB of empty lists": (
        b"\x80\x02" + b"]" * (2 * 2**20 - 16) + b".",
        "expected a dict of tensors, got list",
    ),
}


class TestPickles:
    @pytest.mark.parametrize("payload", list(PAYLOADS))
    def test_payload_is_refused_before_it_builds(self, pytester, hostile, payload: str) -> None:
        data_pkl, says = PAYLOADS[payload]
        model = bin_model(pytester.path)
        torch_archive(model / "pytorch_model.bin", data_pkl)
        hostile.refused(model_arg(model), naming=["pytorch_model.bin", says])

    def test_broadcast_tensor_over_a_tiny_storage(self, pytester, hostile) -> None:
        """Shape [4096, 4096] on stride 0: one element pretending to be 32 MB."""
        model = bin_model(pytester.path)
        one_element = StorageRef("0", torch.BFloat16Storage, 1)
        state = {"w": tensor(one_element, (4096, 4096), (0, 0))}
        torch_archive(model / "pytorch_model.bin", pickled(state), {"0": b"\0\0"})
        hostile.refused(
            model_arg(model), naming=["tensor 'w'", "needs 33554432 bytes but its storage holds 2"]
        )

    def test_storage_larger_than_its_record(self, pytester, hostile) -> None:
        model = bin_model(pytester.path)
        state = {"w": tensor(StorageRef("0", torch.BFloat16Storage, 1024), (1024,), (1,))}
        torch_archive(model / "pytorch_model.bin", pickled(state), {"0": b"\0" * 16})
        hostile.refused(
            model_arg(model), naming=["tensor 'w'", "2048 bytes but its record data/0 holds 16"]
        )

    def test_pickle_over_2_mib(self, pytester, hostile) -> None:
        model = bin_model(pytester.path)
        torch_archive(model / "pytorch_model.bin", pickled({"pad": "x" * 3 * 2**20}))
        hostile.refused(model_arg(model), naming=["data.pkl) is", "over the 2 MiB"])

    def test_zip_directory_over_4_mib(self, pytester, hostile) -> None:
        model = bin_model(pytester.path)
        records = {f"{number:0100d}": b"" for number in range(40_000)}
        torch_archive(model / "pytorch_model.bin", pickled({}), records)
        hostile.refused(model_arg(model), naming=["its zip directory is", "over the 4 MiB"])

    def test_compressed_records(self, pytester, hostile) -> None:
        model = bin_model(pytester.path)
        torch_archive(model / "pytorch_model.bin", pickled({}), compression=zipfile.ZIP_DEFLATED)
        hostile.refused(model_arg(model), naming=["archive/data.pkl", "is compressed"])

    def test_record_named_twice(self, pytester, hostile) -> None:
        model = bin_model(pytester.path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate
            torch_archive(model / "pytorch_model.bin", pickled({}), {"0": b"", "0 ": b""})
            with zipfile.ZipFile(model / "pytorch_model.bin", "a") as archive:
                archive.writestr("archive/data.pkl", pickled({}))
        hostile.refused(model_arg(model), naming=["names a record twice"])

    def test_big_endian(self, pytester, hostile) -> None:
        model = bin_model(pytester.path)
        torch_archive(model / "pytorch_model.bin", pickled({}), byteorder=b"big")
        hostile.refused(model_arg(model), naming=["byte order 'big'"])

    def test_not_a_zip(self, pytester, hostile) -> None:
        model = bin_model(pytester.path)
        (model / "pytorch_model.bin").write_bytes(pickled({"w": Reduce(bytearray, 10**9)}))
        hostile.refused(model_arg(model), naming=["first pickle names __builtin__.bytearray"])


def geometry_checkpoint(root: Path, *, layers: int, heads: int, head_dim: int, hidden: int) -> Path:
    shape = LlamaShape(
        layers=layers, heads=heads, kv_heads=heads, head_dim=head_dim, hidden=hidden, mlp=False
    )
    tensors = {}
    for layer in range(layers):
        for matrix in "qkv":
            tensors[attention_name(layer, matrix)] = torch.zeros(heads * head_dim, hidden)
        tensors[attention_name(layer, "o")] = torch.zeros(hidden, heads * head_dim)
    config = {**shape.config(), "head_dim": head_dim}
    return write_checkpoint(root / "geometry", tensors, config)


class TestGeometry:
    @pytest.mark.parametrize(
        ("geometry", "naming"),
        [
            (  # the example: 160 KB, 80,000 items
                {"layers": 1, "heads": 20_000, "head_dim": 1, "hidden": 1},
                ["'head_dim' gives 1; a head slice must be at least 2 x 2"],
            ),
            (
                {"layers": 1, "heads": 20_000, "head_dim": 2, "hidden": 2},
                ["'num_attention_heads' 20000 x 'num_hidden_layers' 1", "80000 head items"],
            ),
            (
                {"layers": 1, "heads": 20_000, "head_dim": 8, "hidden": 8},
                ["80000 head items of only 64 attention weights each"],
            ),
            (
                {"layers": 2_000, "heads": 1, "head_dim": 4, "hidden": 4},
                ["'num_hidden_layers' 2000", "8000 head items"],
            ),
            (
                {"layers": 1, "heads": 1, "head_dim": 64, "hidden": 1},
                ["'hidden_size' gives 1"],
            ),
        ],
    )
    def test_flood_of_items_is_refused(self, pytester, hostile, geometry, naming) -> None:
        model = geometry_checkpoint(pytester.path, **geometry)
        hostile.refused(model_arg(model), naming=["config.json", *naming])

    def test_bounds(self, tmp_path) -> None:
        """Up to 4096 items any geometry; beyond, at least 1024 weights per item."""
        small = geometry_checkpoint(tmp_path / "a", layers=1, heads=1024, head_dim=2, hidden=2)
        assert open_checkpoint(small).geometry.heads == 1024
        heavy = geometry_checkpoint(tmp_path / "b", layers=1, heads=1040, head_dim=32, hidden=32)
        assert open_checkpoint(heavy).geometry.heads == 1040
        light = geometry_checkpoint(tmp_path / "c", layers=1, heads=1040, head_dim=16, hidden=32)
        with pytest.raises(CheckpointError, match="4160 head items of only 512 attention"):
            open_checkpoint(light)


# --- 4. Files that change under the run ------------------------------------------------------


def change_after_collection(pytester: pytest.Pytester, action: str) -> None:
    """A conftest that changes the checkpoint once the items are collected, before any runs."""
    pytester.makeconftest(
        textwrap.dedent(
            """
            import os, time
            from pathlib import Path

            def pytest_collection_modifyitems(items):
                time.sleep(0.05)  # file times tick with the kernel's coarse clock
            """
        )
        + textwrap.indent(textwrap.dedent(action), "    ")
    )


class TestChangedFiles:
    def test_swapped_for_a_nan_model(self, pytester, hostile) -> None:
        model = write_model(pytester.path)
        nan = {
            n: torch.full_like(t, float("nan"))
            for n, t in load_file(model / "model.safetensors").items()
        }
        save_file(nan, model / "next.safetensors")
        change_after_collection(
            pytester, 'os.replace("model/next.safetensors", "model/model.safetensors")\n'
        )
        outcome = hostile(
            model_arg(model),
            writes=["model/model.safetensors", "model/next.safetensors", "conftest.py"],
        )
        assert outcome.exit_code == pytest.ExitCode.TESTS_FAILED
        assert f"{ITEMS} failed" in outcome.output
        assert (
            "model.safetensors changed after collection (replaced by another file" in outcome.output
        )
        assert "non-finite weights" not in outcome.output  # the NaN file was never read

    def test_rewritten_in_place_with_mtime_restored(self, pytester, hostile) -> None:
        model = write_model(pytester.path)
        change_after_collection(
            pytester,
            """
            path = Path("model/model.safetensors")
            status = path.stat()
            path.write_bytes(path.read_bytes())
            os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
            """,
        )
        outcome = hostile(model_arg(model))
        assert f"{ITEMS} failed" in outcome.output
        assert "rewritten or its metadata changed (ctime)" in outcome.output

    @pytest.mark.parametrize("kind", ["safetensors", "bin"])
    def test_truncated_in_place_fails_items_without_a_crash(
        self, pytester, hostile, kind: str
    ) -> None:
        """Under a memory map this was a SIGBUS that killed the interpreter."""
        if kind == "bin":
            model, name = write_torch_model(pytester.path), "binary/pytorch_model.bin"
        else:
            model, name = write_model(pytester.path), "model/model.safetensors"
        change_after_collection(
            pytester, f'os.truncate("{name}", Path("{name}").stat().st_size // 2)\n'
        )
        outcome = hostile(model_arg(model), writes=[name])
        assert outcome.exit_code == pytest.ExitCode.TESTS_FAILED
        assert f"{ITEMS} failed" in outcome.output
        assert "changed after collection (size" in outcome.output

    def test_cache_sees_an_in_place_rewrite_that_restores_mtime(self, pytester, hostile) -> None:
        """An unsampled weight becomes NaN; size and mtime stay, the ctime moves."""
        shape = LlamaShape(layers=1, heads=4, kv_heads=4, head_dim=64, hidden=512, mlp=False)
        model = write_checkpoint(
            pytester.path / "model",
            random_llama_weights(shape, attention_only=True),
            shape.config(),
        )
        hostile.passes(model_arg(model), items=16)  # fills the cache
        entry = open_checkpoint(model).tensors[(0, "q")]
        position = entry.offset + entry.nbytes // 32  # 8 KiB in: row 8, head 0; not sampled
        path = entry.file
        status = path.stat()
        with path.open("r+b") as handle:
            handle.seek(position)
            handle.write(struct.pack("<H", 0x7FC0))  # a bfloat16 NaN
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
        outcome = hostile(model_arg(model), writes=["model/model.safetensors"])
        assert "1 failed" in outcome.output, outcome.output
        assert "head00-q" in outcome.output


# --- 8. Only tensors the run reads can refuse it ---------------------------------------------


def replace_tensor(model: Path, name: str, value: torch.Tensor) -> None:
    path = model / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = value
    save_file(tensors, path)


class TestUnreadTensors:
    @pytest.mark.parametrize(
        ("name", "value", "says"),
        [
            (
                "model.layers.1.mlp.down_proj.weight",
                torch.zeros(32, 64, dtype=torch.int8),
                "'model.layers.1.mlp.down_proj.weight' has dtype I8",
            ),
            (
                "model.layers.0.mlp.up_proj.weight",
                torch.zeros(0, 32),
                "'model.layers.0.mlp.up_proj.weight' has shape [0, 32]",
            ),
        ],
    )
    def test_unusable_mlp_matrix(self, pytester, hostile, name, value, says) -> None:
        model = write_model(pytester.path)
        replace_tensor(model, name, value)
        hostile.passes(model_arg(model), items=ITEMS)
        hostile.passes(
            model_arg(model), "--spectral-scope=matrix", "--spectral-matrices=q,k,v,o", items=8
        )
        hostile.refused(model_arg(model), "--spectral-scope=matrix", naming=[says])

    def test_non_contiguous_tensor_in_a_bin(self, pytester, hostile) -> None:
        model = write_torch_model(pytester.path)
        path = model / "pytorch_model.bin"
        tensors = torch.load(path, weights_only=True)
        name = "model.layers.0.mlp.down_proj.weight"
        tensors[name] = tensors[name].t().contiguous().t()  # same shape, column-major
        torch.save(tensors, path)
        hostile.passes(model_arg(model), items=ITEMS)
        hostile.refused(
            model_arg(model),
            "--spectral-scope=matrix",
            naming=[f"'{name}' is stored non-contiguous"],
        )

    def test_wrong_shape_in_an_unselected_layer(self, pytester, hostile) -> None:
        model = write_model(pytester.path)
        replace_tensor(model, attention_name(1, "q"), torch.zeros(16, 32))
        hostile.passes(model_arg(model), "--spectral-layers=0", items=16)
        hostile.refused(
            model_arg(model),
            naming=["'model.layers.1.self_attn.q_proj.weight' has shape [16, 32]"],
        )

    def test_views_parameters_and_float8_in_a_bin(self, pytester, hostile) -> None:
        """torch.save writes views with storage offsets, parameters through
        ``_rebuild_parameter`` and float8 through ``_rebuild_tensor_v3``: all located right."""
        reference = write_model(pytester.path)
        tensors = load_file(reference / "model.safetensors")
        q, k, down = (
            attention_name(0, "q"),
            attention_name(0, "k"),
            "model.layers.0.mlp.down_proj.weight",
        )
        padded = torch.cat([torch.ones(3, SHAPE.hidden, dtype=torch.bfloat16), tensors[q]])
        tensors[q] = padded[3:]  # a view 3 rows into its storage
        tensors[k] = torch.nn.Parameter(tensors[k], requires_grad=False)
        tensors[down] = tensors[down].float().to(torch.float8_e4m3fn)
        binary = bin_model(pytester.path)
        torch.save(tensors, binary / "pytorch_model.bin")
        for model, report in ((reference, "st.json"), (binary, "bin.json")):
            result = pytester.runpytest(model_arg(model), f"--spectral-report={report}")
            result.assert_outcomes(passed=ITEMS)
        st, bin_ = (
            json.loads((pytester.path / n).read_text())["items"] for n in ("st.json", "bin.json")
        )
        assert [i["singular_values"] for i in st] == [i["singular_values"] for i in bin_]
        hostile.refused(
            model_arg(binary), "--spectral-scope=matrix", naming=[f"'{down}' has dtype F8_E4M3"]
        )
