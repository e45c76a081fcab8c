"""Fuzzing: mutated checkpoints either work or fail cleanly, never with an internal error.

"Cleanly" means what a user sees: a ``CheckpointError`` (a usage error, exit code 4) when the
files cannot be read, otherwise items that pass or fail on their own merits. The in-process
test drives the same steps as the plugin for a few hundred mutations; the end-to-end test runs
pytest itself on a sample and checks that no traceback reaches the user.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pytest_spectral.checkpoints.checkpoint import MATRICES, open_checkpoint
from pytest_spectral.compute.engine import SpectraEngine
from pytest_spectral.errors import CheckpointError
from pytest_spectral.judging.evaluation import judge
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS, default_request
from pytest_spectral.judging.ranges import IndexSet
from pytest_spectral.judging.rules import Rule
from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights, write_checkpoint

SHAPE = LlamaShape(layers=1, heads=2, kv_heads=1, head_dim=4, hidden=8, mlp=False)
RULE = Rule(
    "fuzz",
    default_request("stable_rank"),
    1.5,
    None,
    frozenset(MATRICES),
    IndexSet.everything(),
    IndexSet.everything(),
    "fail",
)
CONFIG_KEYS = [
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "head_dim",
]
ODD_VALUES = st.one_of(
    st.integers(-3, 70),
    st.integers(2**31, 2**64),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.just("llama"),
    st.lists(st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pristine") / "model"
    return write_checkpoint(
        directory, random_llama_weights(SHAPE, attention_only=True), SHAPE.config()
    )


def byte_flips(size: int) -> st.SearchStrategy:
    return st.lists(
        st.tuples(st.integers(0, size - 1), st.integers(0, 255)), min_size=1, max_size=8
    )


@st.composite
def mutations(draw: st.DrawFn, weights_size: int) -> tuple[str, object]:
    kind = draw(st.sampled_from(["flip", "weights", "truncate", "header", "config", "length"]))
    if kind == "flip":
        return kind, draw(byte_flips(weights_size))
    if kind == "weights":  # only the data section: NaN, Inf, denormals, zeros, huge values
        return kind, draw(
            st.lists(st.tuples(st.integers(1, 2**16), st.integers(0, 255)), min_size=1, max_size=64)
        )
    if kind == "truncate":
        return kind, draw(st.integers(0, weights_size - 1))
    if kind == "length":
        return kind, draw(st.integers(0, 2**64 - 1))
    if kind == "config":
        return kind, (draw(st.sampled_from(CONFIG_KEYS)), draw(ODD_VALUES))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = draw(
        st.one_of(
            ODD_VALUES,
            st.sampled_from(["BF16", "F16", "F32", "F64", "I8", "F8_E4M3", "U8"]),
            st.lists(st.integers(-2, 2**40), max_size=3),
        )
    )
    return kind, (field, value)


def apply(directory: Path, mutation: tuple[str, object]) -> None:
    kind, detail = mutation
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if kind == "flip":
        for position, value in detail:  # type: ignore[union-attr]
            data[position] = value
        weights.write_bytes(bytes(data))
    elif kind == "weights":
        (length,) = struct.unpack("<Q", data[:8])
        data_start = 8 + length
        for offset, value in detail:  # type: ignore[union-attr]
            data[data_start + offset % (len(data) - data_start)] = value
        weights.write_bytes(bytes(data))
    elif kind == "truncate":
        weights.write_bytes(bytes(data[: int(detail)]))  # type: ignore[arg-type]
    elif kind == "length":
        weights.write_bytes(struct.pack("<Q", int(detail)) + bytes(data[8:]))  # type: ignore[arg-type]
    elif kind == "config":
        key, value = detail  # type: ignore[misc]
        config = json.loads((directory / "config.json").read_text())
        config[key] = value
        (directory / "config.json").write_text(json.dumps(config))
    else:
        field, value = detail  # type: ignore[misc]
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        header["model.layers.0.self_attn.q_proj.weight"][field] = value
        raw = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + length :]))


def analyse(directory: Path) -> None:
    """What the plugin does, minus pytest: open, compute every head, judge it."""
    checkpoint = open_checkpoint(directory)
    checkpoint.check_readable(checkpoint.tensors)  # as the plugin does for the items it runs
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS)
    try:
        for head in range(checkpoint.geometry.heads):
            for matrix in MATRICES:
                judge([RULE], 0, head, matrix, engine.head(0, matrix, head))
    finally:
        engine.close()


@settings(
    max_examples=300,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_checkpoint_works_or_is_a_checkpoint_error(pristine, tmp_path_factory, data):
    size = (pristine / "model.safetensors").stat().st_size
    mutation = data.draw(mutations(size))
    directory = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(pristine, directory)
    apply(directory, mutation)
    try:
        analyse(directory)
        event(f"{mutation[0]}: analysed")
    except CheckpointError:
        event(f"{mutation[0]}: checkpoint error")


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_pytest_never_shows_an_internal_traceback(pristine, pytester, data) -> None:
    size = (pristine / "model.safetensors").stat().st_size
    mutation = data.draw(mutations(size))
    directory = pytester.path / f"model-{abs(hash(repr(mutation)))}"
    shutil.copytree(pristine, directory)
    apply(directory, mutation)
    result = pytester.runpytest(f"--spectral-model={directory}", "-p", "no:cacheprovider")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret in (
        pytest.ExitCode.OK,
        pytest.ExitCode.TESTS_FAILED,
        pytest.ExitCode.USAGE_ERROR,
    ), output
    assert "Traceback" not in output
    assert "INTERNALERROR" not in output
    shutil.rmtree(directory)
