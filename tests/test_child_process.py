"""Decomposing in a child process (``--spectral-subprocess``): the same numbers, errors that
name their tensor, a child that dies fails only what it owed, and pytest's process never
imports torch."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from pytest_spectral.checkpoints.checkpoint import open_checkpoint
from pytest_spectral.compute.engine import SpectraEngine, UnitError
from pytest_spectral.compute.isolated import ChildDecomposer, ChildStoppedError
from pytest_spectral.judging.metrics import DEFAULT_REQUESTS
from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights, write_checkpoint
from tests.test_engine import reference_values, weight_of


@pytest.fixture
def checkpoint(make_checkpoint):
    return open_checkpoint(make_checkpoint(layers=3, heads=4, kv_heads=2, head_dim=8, hidden=32))


def _every_head(engine: SpectraEngine, layers: int, heads: int) -> list[object]:
    return [
        engine.head(layer, matrix, head)
        for layer in range(layers)
        for matrix in ("q", "k", "v", "o")
        for head in range(heads)
    ]


def test_a_child_gives_the_same_records_as_this_process(checkpoint) -> None:
    here = SpectraEngine(checkpoint, DEFAULT_REQUESTS, threads=2)
    child = SpectraEngine(checkpoint, DEFAULT_REQUESTS, threads=2, isolate=True, prefetch=True)
    child.plan([(layer, m, "head") for layer in range(3) for m in ("q", "k", "v", "o")])
    try:
        # repr: every float to the last bit, and NaN (an undefined alpha) equal to NaN
        assert repr(_every_head(child, 3, 4)) == repr(_every_head(here, 3, 4))
        assert repr(child.whole(1, "o")) == repr(here.whole(1, "o"))  # outside the plan
    finally:
        here.close()
        child.close()


def test_a_childs_singular_values_match_lapack(checkpoint) -> None:
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS, isolate=True)
    try:
        served = engine.head(2, "k", 3)  # query head 3 reads K/V head 1: rows 8-15
    finally:
        engine.close()
    expected = reference_values(weight_of(checkpoint, 2, "k")[8:16])
    np.testing.assert_allclose(served.singular_values, expected, rtol=1e-9)


def test_a_child_that_dies_fails_what_it_owed_and_is_not_waited_for(checkpoint) -> None:
    decomposer = ChildDecomposer(checkpoint, DEFAULT_REQUESTS)
    try:
        decomposer.start(0, [("q", "head")]).result(timeout=60)  # alive and answering
        os.kill(decomposer.pid, signal.SIGKILL)
        owed = decomposer.start(1, [("q", "head")])
        with pytest.raises(ChildStoppedError, match=r"stopped \(exit code -9\)"):
            owed.result(timeout=60)
        with pytest.raises(ChildStoppedError):  # and so does anything asked for later
            decomposer.start(2, [("q", "head")]).result(timeout=60)
    finally:
        decomposer.close()


def test_a_tensor_the_child_cannot_read_fails_its_items_naming_it(pytester) -> None:
    shape = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, mlp=False)
    model = write_checkpoint(
        pytester.path / "model", random_llama_weights(shape, attention_only=True), shape.config()
    )
    pytester.makeconftest(
        "import time\n"
        "from pathlib import Path\n"
        "def pytest_collection_finish(session):\n"
        "    time.sleep(0.05)  # file times tick with the kernel's coarse clock\n"
        "    shard = Path('model/model.safetensors')\n"
        "    shard.write_bytes(shard.read_bytes())  # same bytes, not the file collected\n"
    )
    result = pytester.runpytest(
        f"--spectral-model={model}", "--spectral-subprocess=on", "--spectral-no-cache"
    )
    # Layer 0 may have been read before the file changed (it is started during collection);
    # layer 1 is read after it.
    assert result.parseoutcomes()["failed"] in (16, 32)
    result.stdout.fnmatch_lines(
        ["*cannot read model.layers.1.self_attn.q_proj.weight from *model.safetensors*changed*"]
    )
    assert "Traceback" not in result.stdout.str()


def test_pytests_process_never_imports_torch_when_a_child_decomposes(
    pytester, tiny_checkpoint
) -> None:
    pytester.makeconftest(
        "import sys\n"
        "def pytest_sessionfinish(session):\n"
        "    with open('imported.txt', 'w') as handle:\n"
        "        handle.write(str('torch' in sys.modules))\n"
    )
    result = pytester.runpytest_subprocess(
        f"--spectral-model={tiny_checkpoint}",
        "--spectral-subprocess=on",
        "--spectral-report=report.json",
        "-p",
        "no:xdist",
    )
    result.assert_outcomes(passed=32)
    assert (pytester.path / "imported.txt").read_text() == "False"
    records = json.loads((pytester.path / "report.json").read_text())["items"]
    assert {r["method"] for r in records} == {"gram"}  # they were computed, by the child


def test_a_run_ends_promptly_when_a_child_has_work_queued(pytester, tiny_checkpoint) -> None:
    """Stopping at the first failure leaves the layers computed ahead unclaimed: the child is
    closed with work queued and the run still ends (a hang fails at the timeout)."""
    (pytester.path / "rules.toml").write_text('[[rules]]\nmetric = "stable_rank"\nmax = 0\n')
    result = pytester.runpytest_subprocess(
        f"--spectral-model={tiny_checkpoint}",
        "--spectral-subprocess=on",
        "--spectral-thresholds=rules.toml",
        "-x",
        timeout=60,
    )
    result.assert_outcomes(failed=1)


@pytest.mark.parametrize("value", ["maybe", "", "ON "])
def test_subprocess_option_takes_auto_on_or_off(pytester, tiny_checkpoint, value) -> None:
    result = pytester.runpytest(
        f"--spectral-model={tiny_checkpoint}", f"--spectral-subprocess={value}"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--spectral-subprocess*auto*on*off*"])



def test_what_a_child_prints_while_python_starts_goes_to_stderr(
    checkpoint, tmp_path, monkeypatch, capfd
) -> None:
    """A printing sitecustomize runs before the child can move its output out of the way."""
    (tmp_path / "sitecustomize.py").write_text("print('hello from sitecustomize')\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    decomposer = ChildDecomposer(checkpoint, DEFAULT_REQUESTS)
    try:
        decomposed = decomposer.start(0, [("q", "head")]).result(timeout=60)
    finally:
        decomposer.close()
    expected = reference_values(weight_of(checkpoint, 0, "q")[:8])  # query head 0: rows 0-7
    values = decomposed[("q", "head")].singular_values[0]
    np.testing.assert_allclose(values, expected, rtol=1e-9)
    assert "hello from sitecustomize" in capfd.readouterr().err


def test_a_conftest_metric_works_with_a_child_that_cannot_import_the_conftest(
    pytester, tiny_checkpoint
) -> None:
    """The README's own lambda metric, its conftest in a test directory below the one pytest
    runs from: the child computes only the built-in metrics, pytest's process the others."""
    tests = pytester.mkdir("tests")
    (tests / "conftest.py").write_text(
        "def pytest_spectral_register_metrics(metrics):\n"
        "    metrics.add('tail_share', lambda sv, k=4: sv[..., -k:].sum(-1) / sv.sum(-1),\n"
        "                'share of the k smallest singular values', k=4)\n"
    )
    reports = {}
    for choice in ("on", "off"):
        result = pytester.runpytest_subprocess(
            "tests",
            f"--spectral-model={tiny_checkpoint}",
            f"--spectral-subprocess={choice}",
            "--spectral-no-cache",
            f"--spectral-report={choice}.json",
            "-p",
            "no:xdist",
        )
        result.assert_outcomes(passed=32)
        assert "Traceback" not in result.stdout.str() + result.stderr.str()
        reports[choice] = json.loads((pytester.path / f"{choice}.json").read_text())["items"]
    first = reports["on"][0]
    sv = np.array(first["singular_values"])
    assert first["metrics"]["tail_share"] == pytest.approx(sv[-4:].sum() / sv.sum(), rel=1e-12)
    assert [r["metrics"] for r in reports["on"]] == [r["metrics"] for r in reports["off"]]


def test_a_child_that_cannot_start_fails_the_items_saying_why(checkpoint, monkeypatch) -> None:
    monkeypatch.setattr("sys.executable", "/nonexistent/python")
    engine = SpectraEngine(checkpoint, DEFAULT_REQUESTS, isolate=True)
    try:
        with pytest.raises(UnitError, match=r"cannot start decomposing: .*nonexistent/python"):
            engine.head(0, "q", 0)
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("threshold", "choice", "children"),
    [(1, "auto", 1), (10**12, "auto", 0), (10**12, "on", 1), (1, "off", 0)],
)
def test_auto_starts_a_child_from_a_number_of_weights(
    pytester, tiny_checkpoint, monkeypatch, threshold, choice, children
) -> None:
    """The tiny checkpoint's attention holds 2 x (64x64 + 2 x 32x64 + 64x64) = 24,576 weights.
    A conftest sets the threshold and counts the children started (in a process of its own:
    pytester's in-process runs re-import the plugin's modules)."""
    pytester.makeconftest(
        "import pytest_spectral.run as run\n"
        "from pytest_spectral.compute import isolated\n"
        f"run.ISOLATE_FROM_WEIGHTS = {threshold}\n"
        "original = isolated.ChildDecomposer.__init__\n"
        "def spy(self, *args, **kwargs):\n"
        "    with open('children.txt', 'a') as handle:\n"
        "        handle.write('child\\n')\n"
        "    original(self, *args, **kwargs)\n"
        "isolated.ChildDecomposer.__init__ = spy\n"
    )
    # A single process, even when this suite runs under xdist (its variables are inherited).
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    result = pytester.runpytest_subprocess(
        f"--spectral-model={tiny_checkpoint}", f"--spectral-subprocess={choice}", "-p", "no:xdist",
        "--spectral-no-cache",
    )  # fmt: skip
    result.assert_outcomes(passed=32)
    log = pytester.path / "children.txt"
    assert (log.read_text().count("child") if log.exists() else 0) == children
