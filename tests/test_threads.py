"""Threads per process honour a container's CPU quota, as loky (joblib's executor) reads it.

The quota is faked the way loky reads it: the cgroup files it opens (``/sys/fs/cgroup/cpu.max``
for cgroup v2, ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` for v1) are served from a test
directory, on a machine that claims 64 cores.
"""

from __future__ import annotations

import builtins
import os

import pytest
from loky.backend import context

from pytest_spectral.compute.device import default_threads

V2 = "/sys/fs/cgroup/cpu.max"
V1_QUOTA, V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A 64-core machine whose cgroup files hold what the test writes."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOKY_MAX_CPU_COUNT", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    files: dict[str, str] = {}
    real_exists, real_open = os.path.exists, builtins.open

    def exists(path: object) -> bool:
        if str(path).startswith("/sys/fs/cgroup"):
            return str(path) in files
        return real_exists(path)

    def fake_open(path: object, *args: object, **kwargs: object) -> object:
        if str(path) in files:
            copy = tmp_path / str(path).replace("/", "_")
            copy.write_text(files[str(path)])
            return real_open(copy, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os.path, "exists", exists)
    monkeypatch.setattr(context, "open", fake_open, raising=False)
    return files


@pytest.mark.parametrize(
    ("cgroup", "threads"),
    [
        ({}, 64),  # no cgroup files: no quota
        ({V2: "400000 100000\n"}, 4),  # cgroup v2: 4 CPUs' worth
        ({V2: "150000 100000\n"}, 2),  # 1.5 CPUs rounds up
        ({V2: "max 100000\n"}, 64),  # v2 without a limit
        ({V1_QUOTA: "300000\n", V1_PERIOD: "100000\n"}, 3),  # cgroup v1
        ({V1_QUOTA: "-1\n", V1_PERIOD: "100000\n"}, 64),  # v1 without a limit
    ],
)
def test_quota_sets_the_thread_count(machine, cgroup, threads) -> None:
    machine.update(cgroup)
    assert default_threads() == threads


def test_quota_is_shared_among_xdist_workers(machine, monkeypatch) -> None:
    machine[V2] = "800000 100000\n"
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    assert default_threads() == 2


def test_affinity_still_counts(machine, monkeypatch) -> None:
    machine[V2] = "800000 100000\n"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_threads() == 3
