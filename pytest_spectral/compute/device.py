"""Where and with how many threads the decomposition runs.

Threads are set on purpose: on a busy two-core machine, BLAS threads that outnumber the cores
spin-wait and made a batch of small ``eigvalsh`` calls a hundred times slower. Each
pytest-xdist worker therefore gets its share of the cores the process may use (a container's
CPU quota included, not the host's core count), and each worker on a multi-GPU machine its own
GPU (worker gwN takes GPU N mod count).

torch is imported only to answer questions about accelerators, so ``cpu`` and a run served
entirely from the cache never import it.
"""

from __future__ import annotations

import os

from pytest_spectral.errors import DeviceError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def xdist_worker_index() -> int | None:
    """N for pytest-xdist worker gwN; None in a single process or on the controller."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else None


def xdist_worker_count() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)


def usable_cores() -> int:
    """The cores this process may use: the fewest of the machine's, its CPU affinity and a
    container's CPU quota (cgroup v1 ``cpu.cfs_quota_us`` or v2 ``cpu.max``, rounded up), as
    loky (joblib's process executor) counts them; ``LOKY_MAX_CPU_COUNT`` caps it further."""
    from loky import cpu_count

    return cpu_count(only_physical_cores=False)


def default_threads() -> int:
    """This process's share of the usable cores, dividing them among pytest-xdist workers."""
    return max(1, usable_cores() // xdist_worker_count())


def _available() -> str:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return ", ".join(devices)


def resolve_device(spec: str, precision: str) -> str:
    """Turn ``--spectral-device`` into a concrete torch device string, or raise DeviceError.

    ``auto`` is ``cuda`` when available, else ``cpu``. ``cuda`` on pytest-xdist worker gwN is
    GPU ``N mod count``.
    """
    spec = spec.strip().lower()
    if spec == "cpu":
        return "cpu"
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
        if spec == "cpu":
            return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--spectral-device {spec}: CUDA is not available here (available: {_available()})"
            )
        count = torch.cuda.device_count()
        if spec == "cuda":
            return f"cuda:{(xdist_worker_index() or 0) % count}"
        index = spec.removeprefix("cuda:")
        if not index.isdigit() or int(index) >= count:
            raise DeviceError(f"--spectral-device {spec}: no such GPU (available: {_available()})")
        return spec
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(
                f"--spectral-device mps: MPS is not available here (available: {_available()})"
            )
        if precision == "float64":
            raise DeviceError(
                "--spectral-device mps: MPS has no float64; add --spectral-dtype float32 "
                "(about 1e-6 relative accuracy) or use the CPU"
            )
        return "mps"
    raise DeviceError(f"--spectral-device {spec!r}: expected {DEVICE_CHOICES}")
