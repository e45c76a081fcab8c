"""The same numbers whatever the threads, workers or processes: JSON reports identical value
for value.

Every slice is decomposed on one thread in a fixed order of operations (the pool only decides
which thread), so neither ``--spectral-threads``, pytest-xdist nor a child process
(``--spectral-subprocess``) can change a bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from pytest_spectral.testing.synthetic import LlamaShape, trained_like_layer, write_checkpoint

# Slices large enough that BLAS would split their products across threads if allowed to.
SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=64, hidden=1024, mlp=False)


@pytest.fixture
def trained_like(pytester: pytest.Pytester):
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(SHAPE.layers):
        tensors.update(trained_like_layer(SHAPE, layer, generator))
    return write_checkpoint(pytester.path / "trained-like", tensors, SHAPE.config(), shards=2)


def test_reports_are_identical_whatever_the_threads_or_workers(pytester, trained_like) -> None:
    runs = {
        "one process, 2 threads": ("-p", "no:xdist", "--spectral-threads=2"),
        "one process, 1 thread": ("-p", "no:xdist", "--spectral-threads=1"),
        "one process, default threads": ("-p", "no:xdist"),
        "one process, a child decomposing": ("-p", "no:xdist", "--spectral-subprocess=on"),
        "two workers": ("-n", "2", "--dist", "loadscope"),
    }
    reports = {}
    for number, (name, options) in enumerate(runs.items()):
        result = pytester.runpytest_subprocess(
            f"--spectral-model={trained_like}",
            "--spectral-no-cache",
            f"--spectral-report=report-{number}.json",
            *options,
        )
        result.assert_outcomes(passed=32)
        reports[name] = json.loads((pytester.path / f"report-{number}.json").read_text())
        reports[name].pop("created")
    first, *others = reports.values()
    for name, report in zip(list(reports)[1:], others, strict=True):
        assert report == first, name
    methods = {item["method"] for item in first["items"]}
    assert methods == {"gram", "cholqr2"}  # both routes are exercised
