"""Shared fixtures: small checkpoints written in the Hugging Face layout, per test.

pytest imports this file in every run started from the repository root (``testpaths``),
the demo's spectral run included, so it imports nothing heavy at module level: torch and
hypothesis load only when a test needs them. A cached spectral run from here then imports
no torch, as the README promises (tested in ``test_readme.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

MakeCheckpoint = Callable[..., Path]


def pytest_configure(config: pytest.Config) -> None:
    """Wall-clock deadlines turn a busy shared 2-core machine into flaky failures; the fuzz
    test keeps its own deadline to catch real hangs. The profile must be loaded before the
    test modules create their ``@settings``; a spectral run without path arguments collects
    no test module, and skips it.

    Mutation runs (pyproject.toml, ``[tool.mutmut]``) pass ``--hypothesis-profile=mutation``:
    they run the same tests many times in one process and must give the same verdict each
    time, so fixed examples (fewer: each mutant runs them) and no example database.
    """
    spectral_only = (
        config.getoption("spectral_model", None) is not None
        and config.args_source != pytest.Config.ArgsSource.ARGS
    )
    if not spectral_only:
        from hypothesis import HealthCheck, settings

        default = settings.get_profile("default")  # not whatever an earlier run loaded
        settings.register_profile("pytest-spectral", default, deadline=None)
        settings.register_profile(
            "mutation",
            default,
            deadline=None,
            derandomize=True,
            max_examples=25,
            database=None,
            suppress_health_check=[HealthCheck.differing_executors],
        )
        if config.getoption("hypothesis_profile", None) is None:
            settings.load_profile("pytest-spectral")


END_TO_END_FILES = (
    "tests/test_gating.py",
    "tests/test_history.py",
    "tests/test_history_inputs.py",
    "tests/test_experts.py",
    "tests/test_regressions.py",
    "tests/test_stacks.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a mutation run, run a mutant's tests fastest first, and in its unit pass only the
    unit tests.

    mutmut (pyproject.toml, ``[tool.mutmut]``) stops a mutant's run at its first failing test
    and passes the tests in no particular order, so a mutant that a 0.01 s unit test kills
    could first wait on a 10 s end-to-end run. The durations are those mutmut recorded in
    its stats pass, in ``mutmut-stats.json`` of the directory it runs the tests from; tests
    it has no duration for go last.

    ``SPECTRAL_MUTATION_PASS=unit`` leaves out the end-to-end files of the selection, whose
    pytester runs cost a surviving mutant half a minute: the README's two-pass run tests every
    mutant against the unit tests first, then only the survivors against all. Outside a
    mutation run this does nothing.
    """
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if not mutant:
        return
    if os.environ.get("SPECTRAL_MUTATION_PASS") == "unit":
        kept: list[pytest.Item] = []
        left_out: list[pytest.Item] = []
        for item in items:
            (left_out if item.nodeid.startswith(END_TO_END_FILES) else kept).append(item)
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept
    stats = Path("mutmut-stats.json")
    if "__mutmut_" in mutant and stats.is_file():
        duration = json.loads(stats.read_text())["duration_by_test"]
        items.sort(key=lambda item: duration.get(item.nodeid, float("inf")))


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """pytester with an ini file in its directory, so that it is pytest's rootdir.

    Users run pytest from their project root, where node ids print as they are; without the
    ini, pytest would root the run at a common ancestor of the test and checkpoint paths.
    """
    pytester.makeini("[pytest]\n")
    return pytester


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> MakeCheckpoint:
    """Write a random Llama-layout checkpoint; keyword arguments go to :class:`LlamaShape`."""
    import torch

    from pytest_spectral.testing.synthetic import LlamaShape, write_random_llama

    counter = iter(range(1000))

    def make(
        *, dtype: torch.dtype = torch.bfloat16, shards: int = 1, seed: int = 0, **shape: int
    ) -> Path:
        directory = tmp_path / f"checkpoint-{next(counter)}"
        return write_random_llama(
            directory, LlamaShape(**shape), seed=seed, dtype=dtype, shards=shards
        )

    return make


@pytest.fixture
def tiny_checkpoint(make_checkpoint: MakeCheckpoint) -> Path:
    """2 layers, 4 query heads sharing 2 K/V heads, head_dim 16, hidden 64: 32 items."""
    return make_checkpoint(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64)
