"""Reading and decomposing a layer's units on threads of this process.

:class:`LocalDecomposer` takes the units of a layer that the cache could not serve, reads
their tensors (each once, on the calling thread), hands every slice to a pool of ``threads``
threads (each slice on one thread with one intra-op thread, so values never depend on the
number of threads: see :mod:`pytest_spectral.compute.spectra`), and on a finishing thread of
its own waits for them, adds the built-in metric columns and drops the tensors. Reading the
next layer therefore overlaps with decomposing this one, and computing this one's metrics
with decomposing the next. At most :data:`LAYERS_READ` layers' tensors are held at once.

The engine uses it directly, or through :mod:`pytest_spectral.compute.isolated` in a child
process, which gives the decomposition an interpreter lock of its own.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from pytest_spectral.checkpoints.checkpoint import CIRCUITS, Checkpoint
from pytest_spectral.compute.units import (
    Unit,
    UnitError,
    describe,
    metric_column,
    metric_context,
    read_failure,
)
from pytest_spectral.judging.metrics import METRICS, MetricRequest
from pytest_spectral.results import SliceSpectra

if TYPE_CHECKING:
    import torch

    from pytest_spectral.checkpoints.reader import WeightReader
    from pytest_spectral.compute.circuits import CircuitFactors
    from pytest_spectral.compute.spectra import PendingSpectra

#: Layers whose tensors may be held at once: the one being decomposed and the next, read
#: meanwhile (a layer of a large mixture of experts can be gigabytes).
LAYERS_READ = 2

#: What a decomposer gives back for a batch of units: each unit's spectra with the built-in
#: metric columns, or the error that stopped it
Decomposed = dict[Unit, SliceSpectra | UnitError]


def builtin_requests(requests: Sequence[MetricRequest]) -> tuple[MetricRequest, ...]:
    """The requests of this package's own metrics: the only ones a decomposer computes (and a
    child process can import; a conftest's are computed by the engine from the values)."""
    return tuple(r for r in requests if METRICS.get(r.name) is r.spec)


class LocalDecomposer:
    """Reads and decomposes units in this process (see the module docstring).

    ``requests`` are the metrics whose columns are added to each unit's spectra; only this
    package's built-in ones are computed here (a conftest's may change without the cache
    knowing, so the engine computes those itself from the values).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        requests: Sequence[MetricRequest],
        *,
        device: str = "cpu",
        precision: str = "float64",
        threads: int | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.requests = builtin_requests(requests)
        self.device = device
        self.precision = precision
        self.threads = threads
        self._reader_instance: WeightReader | None = None
        self._slice_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pytest-spectral")
        self._read_slots = threading.BoundedSemaphore(LAYERS_READ)

    def start(self, layer: int, units: Sequence[Unit]) -> Future[Decomposed]:
        """Read ``units`` of ``layer`` and start decomposing them, once fewer than
        :data:`LAYERS_READ` layers hold tensors (this call waits until then).

        Never raises for a unit: what stops one is its :class:`UnitError` in the result.
        """
        self._read_slots.acquire()
        try:
            # Every unit is started before any is waited for: the pool shares all of the
            # layer's slices, whole matrices included.
            started = {unit: self._start(layer, unit) for unit in units}
            return self._finisher.submit(self._finish_all, layer, started)
        except BaseException:
            self._read_slots.release()
            raise

    def close(self) -> None:
        self._finisher.shutdown(wait=True, cancel_futures=True)
        if self._slice_pool is not None:
            self._slice_pool.shutdown(wait=True, cancel_futures=True)

    def _finish_all(
        self, layer: int, started: dict[Unit, PendingSpectra | Future[SliceSpectra] | UnitError]
    ) -> Decomposed:
        try:
            return {unit: self._finish(layer, unit, pending) for unit, pending in started.items()}
        finally:
            self._release(layer, started)
            self._read_slots.release()

    def _start(
        self, layer: int, unit: Unit
    ) -> PendingSpectra | Future[SliceSpectra] | UnitError:
        """Read the unit and start decomposing it, or the error naming its tensor."""
        try:
            if unit[0] in CIRCUITS:
                return self._start_circuits(layer, *self._circuit_factors(layer, unit[0]))
            return self._start_decomposition(self._blocks(layer, unit))
        except Exception as exc:
            return read_failure(self.checkpoint, layer, unit, exc)

    def _finish(
        self, layer: int, unit: Unit, pending: PendingSpectra | Future[SliceSpectra] | UnitError
    ) -> SliceSpectra | UnitError:
        """The unit's spectra with the built-in metric columns, or the error that stopped it."""
        if isinstance(pending, UnitError):
            return pending
        try:
            spectra = pending.result()
        except Exception as exc:
            names = " and ".join(s.name for s in self.checkpoint.sources(layer, unit[0]))
            return UnitError(f"cannot decompose {names} ({unit[1]} scope): {describe(exc)}")
        try:
            context = metric_context(self.checkpoint, layer, unit, spectra.floor)
            columns = {
                request.key: metric_column(request, spectra.singular_values, context)
                for request in self.requests
            }
        except UnitError as exc:
            return exc
        return dataclasses.replace(
            spectra, metrics={key: np.asarray(column) for key, column in columns.items()}
        )

    def _release(self, layer: int, units: Iterable[Unit]) -> None:
        """Drop the tensors of ``layer``'s units: once per layer, not per matrix (a fused
        Q/K/V tensor serves three units)."""
        if self._reader_instance is None:
            return
        for matrix in dict.fromkeys(matrix for matrix, _ in units):
            for source in self.checkpoint.sources(layer, matrix):
                self._reader_instance.release(source)

    def _reader(self) -> WeightReader:
        from pytest_spectral.checkpoints.reader import WeightReader

        if self._reader_instance is None:
            self._reader_instance = WeightReader()
        return self._reader_instance

    def _blocks(self, layer: int, unit: Unit) -> torch.Tensor:
        """The unit's slices as views of the tensor as read (``[slices, m, n]``)."""
        from pytest_spectral.compute.spectra import expert_blocks, head_blocks, whole_matrix

        matrix, scope = unit
        experts = self.checkpoint.experts.get((layer, matrix))
        if experts is not None:
            weights = [self._reader().tensor(source) for source in experts.sources]
            return expert_blocks(weights, experts.matrix)
        weight = self._reader().tensor(self.checkpoint.tensors[(layer, matrix)])
        # the layer's stack's own: a vision tower's heads are not its text model's
        geometry, layout = self.checkpoint.geometry_at(layer), self.checkpoint.layout_at(layer)
        if scope == "head":
            return head_blocks(weight, matrix, geometry, layout)
        return whole_matrix(weight, matrix, geometry, layout)[None]

    def _circuit_factors(self, layer: int, circuit: str) -> tuple[CircuitFactors, CircuitFactors]:
        from pytest_spectral.compute.circuits import read_circuit_factors

        return read_circuit_factors(self._reader(), self.checkpoint, layer, circuit)

    def _start_decomposition(self, blocks: torch.Tensor) -> PendingSpectra:
        """Torch computes only here and in :meth:`_start_circuits`."""
        from pytest_spectral.compute.spectra import start_slices

        pool = self._pool()
        return start_slices(blocks, device=self.device, dtype=self._dtype(), executor=pool)

    def _start_circuits(
        self, layer: int, left: CircuitFactors, right: CircuitFactors
    ) -> Future[SliceSpectra]:
        """A layer's circuits as one task of the slice pool, whose threads each run torch on
        one intra-op thread: their values, too, never depend on the number of threads."""
        from pytest_spectral.compute.circuits import circuit_spectra

        pool = self._pool()
        geometry = self.checkpoint.geometry_at(layer)
        kv_heads = [geometry.kv_head_of(h) for h in range(left.factors.shape[0])]
        return pool.submit(
            circuit_spectra, left, right, kv_heads, device=self.device, dtype=self._dtype()
        )

    def _pool(self) -> ThreadPoolExecutor:
        """The slice pool, started when something must be computed: ``threads`` (``None``:
        :func:`~pytest_spectral.compute.device.default_threads`) threads on the resolved
        device."""
        from pytest_spectral.compute.device import default_threads, resolve_device
        from pytest_spectral.compute.spectra import slice_executor

        with self._pool_lock:  # units outside the plan start on the caller's thread
            if self._slice_pool is None:
                self.device = resolve_device(self.device, self.precision)
                self._slice_pool = slice_executor(max(1, self.threads or default_threads()))
            return self._slice_pool

    def _dtype(self) -> torch.dtype:
        import torch

        return torch.float64 if self.precision == "float64" else torch.float32
