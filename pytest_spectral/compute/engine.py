"""Serving per-head spectra to items: one batched computation per layer, ahead of need.

Items ask for one head at a time, but computing a head alone would read its tensor once per
head. The engine computes every head of a layer's matrices in one batch (reading each tensor
once), keeps only the layers in use, and in a single process computes the next layers on a
background thread while pytest runs the current layer's items: torch releases the GIL, so
the two overlap on separate cores. The slices of a layer's matrices are decomposed on a
pool of ``threads`` threads, each slice on one thread, so values never depend on the number
of threads or workers (see :mod:`pytest_spectral.compute.spectra`).

A failure is confined to its unit, one (layer, matrix, scope): a tensor that cannot be read
or decomposed fails that unit's items with the tensor's name and the cause, and the rest of
the layer is served as usual.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from pytest_spectral.checkpoints.checkpoint import CIRCUITS, MATRICES, Checkpoint
from pytest_spectral.checkpoints.families import matrix_kind, split_expert_item
from pytest_spectral.compute.cache import SpectraCache, entry_key
from pytest_spectral.judging.metrics import METRICS, MetricContext, MetricRequest, measurement_floor
from pytest_spectral.results import HeadSpectrum, LayerStats, SliceSpectra

if TYPE_CHECKING:
    import torch

    from pytest_spectral.checkpoints.reader import WeightReader
    from pytest_spectral.compute.circuits import CircuitFactors
    from pytest_spectral.compute.spectra import PendingSpectra

#: Layers computed ahead of the one whose items run (a single process only). More than one:
#: pytest's items and the decomposition then never wait for each other at a layer boundary.
LAYERS_AHEAD = 2
#: Bump when the decomposition's routes or their numbers change (part of the cache key).
ALGORITHM = "gram/cholqr2/qr-1"


class UnitError(Exception):
    """One (layer, matrix, scope) could not be served; its items fail with this message."""


class MetricError(UnitError, ValueError):
    """A metric function (typically a user's) that failed or returned the wrong shape."""


#: (matrix, scope): one spectrum per distinct head ("head") or a single one ("matrix"), or
#: the error that stopped that unit
Unit = tuple[str, str]
LayerResults = dict[Unit, list[HeadSpectrum] | UnitError]


class SpectraEngine:
    def __init__(
        self,
        checkpoint: Checkpoint,
        requests: Sequence[MetricRequest],
        *,
        device: str = "cpu",
        precision: str = "float64",
        threads: int | None = None,
        cache: SpectraCache | None = None,
        prefetch: bool = False,
        on_layer: Callable[[LayerStats], None] | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.requests = tuple(requests)
        self.device = device
        self.precision = precision
        self.threads = threads
        self.cache = cache
        self.prefetch = prefetch
        self.on_layer = on_layer
        self._reader_instance: WeightReader | None = None
        self._plan: dict[int, tuple[Unit, ...]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pytest-spectral")
        self._slice_pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future[tuple[LayerResults, LayerStats]]] = {}
        self._consumed: set[int] = set()

    def plan(self, needed: Sequence[tuple[int, str, str]]) -> None:
        """Declare which (layer, matrix, scope) triples will be asked for, in run order.

        Only those tensors are read; without a plan every head matrix of a requested layer is.
        """
        plan: dict[int, dict[Unit, None]] = {}
        for layer, matrix, scope in needed:  # a layer's experts of one kind are one unit
            plan.setdefault(layer, {})[(matrix_kind(matrix), scope)] = None
        self._plan = {layer: tuple(units) for layer, units in plan.items()}
        if self.prefetch and self._plan:
            # Start on the first layer (and torch's import) while pytest finishes starting up.
            self._submit(next(iter(self._plan)))

    def head(self, layer: int, matrix: str, head: int) -> HeadSpectrum:
        """The spectrum of query head ``head`` (its shared K/V head for k and v)."""
        geometry = self.checkpoint.geometry_at(layer)
        index = geometry.kv_head_of(head) if matrix in ("k", "v") else head
        return self._unit(layer, (matrix, "head"))[index]

    def whole(self, layer: int, matrix: str) -> HeadSpectrum:
        """The spectrum of the whole matrix (q, k, v, o or an MLP matrix) of ``layer``; for
        an expert's matrix (``expert05-gate``), computed with every expert of its kind."""
        kind, expert = split_expert_item(matrix)
        return self._unit(layer, (kind, "matrix"))[expert or 0]

    def _unit(self, layer: int, unit: Unit) -> list[HeadSpectrum]:
        results = self._layer(layer)
        if unit not in results:  # asked for outside the plan
            results[unit] = self._finish(layer, unit, self._start(layer, unit))[0]
            if self._reader_instance is not None:  # its tensors are not held for a later layer
                for source in self.checkpoint.sources(layer, unit[0]):
                    self._reader_instance.release(source)
        served = results[unit]
        if isinstance(served, UnitError):
            raise served
        return served

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._slice_pool is not None:
            self._slice_pool.shutdown(wait=True, cancel_futures=True)

    def _layer(self, layer: int) -> LayerResults:
        future = self._futures.get(layer) or self._submit(layer)
        results, stats = future.result()
        if layer not in self._consumed:
            self._consumed.add(layer)
            upcoming = self._next_planned(layer)
            for stale in [k for k in self._futures if k != layer and k not in upcoming]:
                del self._futures[stale]
            for ahead in upcoming if self.prefetch else ():
                if ahead not in self._futures:
                    self._submit(ahead)
            if self.on_layer:
                self.on_layer(stats)
        return results

    def _submit(self, layer: int) -> Future[tuple[LayerResults, LayerStats]]:
        future = self._executor.submit(self._compute_layer, layer)
        self._futures[layer] = future
        return future

    def _next_planned(self, layer: int) -> list[int]:
        """The planned layers after ``layer`` that are computed ahead of the items."""
        layers = list(self._plan)
        if layer not in self._plan:
            return []
        start = layers.index(layer) + 1
        return layers[start : start + LAYERS_AHEAD]

    def _compute_layer(self, layer: int) -> tuple[LayerResults, LayerStats]:
        start = time.perf_counter()
        units = self._plan.get(layer, tuple((m, "head") for m in MATRICES))
        # Start every unit before waiting for any, so the pool shares all of the layer's slices.
        started = {unit: self._start(layer, unit) for unit in units}
        results: LayerResults = {}
        slices = refined = cached = 0
        for unit in units:
            heads, from_cache = self._finish(layer, unit, started[unit])
            results[unit] = heads
            if isinstance(heads, list):
                slices += len(heads)
                refined += sum(h.method in ("cholqr2", "qr") for h in heads)
                cached += from_cache
        if self._reader_instance is not None:
            # Once per layer, not per matrix: a fused Q/K/V tensor serves three units.
            for matrix in dict.fromkeys(matrix for matrix, _ in units):
                for source in self.checkpoint.sources(layer, matrix):
                    self._reader_instance.release(source)
        stats = LayerStats(layer, slices, refined, cached, time.perf_counter() - start)
        return results, stats

    def _start(self, layer: int, unit: Unit) -> _Started | UnitError:
        """Serve the unit from the cache, else read it and start decomposing it.

        Never raises: what stops the unit is returned, naming its tensor and the cause.
        """
        try:
            key = self._cache_key(layer, unit) if self.cache is not None else None
            hit = self.cache.load(key) if self.cache is not None and key is not None else None
            if hit is not None:
                return _Started(key, hit, None)
            if unit[0] in CIRCUITS:
                factors = self._circuit_factors(layer, unit[0])
                return _Started(key, None, self._start_circuits(layer, *factors))
            blocks = self._blocks(layer, unit)
        except Exception as exc:
            return UnitError(f"cannot read {self._names(layer, unit)}: {_cause(exc)}")
        return _Started(key, None, self._start_decomposition(blocks))

    def _names(self, layer: int, unit: Unit) -> str:
        """The tensors a unit reads, as messages name them (a circuit reads two)."""
        sources = self.checkpoint.sources(layer, unit[0])
        return " and ".join(f"{source.name} from {source.file}" for source in sources)

    def _finish(
        self, layer: int, unit: Unit, started: _Started | UnitError
    ) -> tuple[list[HeadSpectrum] | UnitError, bool]:
        """The unit's spectra with every requested metric, or the error that stopped it."""
        if isinstance(started, UnitError):
            return started, False
        spectra, from_cache = started.cached, True
        if spectra is None:
            try:
                spectra = started.pending.result()  # type: ignore[union-attr]
            except Exception as exc:
                names = " and ".join(s.name for s in self.checkpoint.sources(layer, unit[0]))
                failure = f"cannot decompose {names} ({unit[1]} scope): {_cause(exc)}"
                return UnitError(failure), False
            from_cache = False
        try:
            if not from_cache:
                spectra = self._with_builtin_metrics(spectra, layer, unit)
                if self.cache is not None and started.key is not None:
                    self.cache.store(started.key, spectra)
            return self._heads(layer, unit, spectra), from_cache
        except UnitError as exc:
            return exc, from_cache

    def _heads(self, layer: int, unit: Unit, spectra: SliceSpectra) -> list[HeadSpectrum]:
        values = spectra.singular_values
        context = self._context(layer, unit, spectra.floor)
        metrics = {
            request.key: (
                spectra.metrics[request.key].tolist()
                if request.key in spectra.metrics
                else _column(request, values, context)
            )
            for request in self.requests
        }
        if "nonfinite_count" in metrics:
            metrics["nonfinite_count"] = [float(n) for n in spectra.nonfinite]
        with np.errstate(invalid="ignore"):
            limited = (values[:, -1] < measurement_floor(values, context)).tolist()
        return [
            HeadSpectrum(
                singular_values=row,
                metrics={key: column[i] for key, column in metrics.items()},
                nonfinite=spectra.nonfinite[i],
                method=spectra.methods[i],
                floor_limited=bool(limited[i]),
            )
            for i, row in enumerate(values.tolist())
        ]

    def _context(self, layer: int, unit: Unit, floor: np.ndarray | None = None) -> MetricContext:
        matrix, scope = unit
        return MetricContext(
            self.checkpoint.item_shape(matrix, whole=scope == "matrix", block=layer),
            self.checkpoint.sources(layer, matrix)[0].dtype,
            None if floor is None else tuple(floor.tolist()),
        )

    def _cache_key(self, layer: int, unit: Unit) -> str:
        matrix, scope = unit
        # the layer's stack's own geometry: a vision tower's heads are not its text model's
        g, stored = self.checkpoint.geometry_at(layer), self.checkpoint.layout_at(layer)
        layout = (matrix, scope, g.heads, g.kv_heads, g.head_dim, stored.fused, stored.conv1d)
        if g.latent is not None:  # how the latent layout's rows split between K_nope and V
            layout += tuple(dataclasses.astuple(g.latent))
        first, *others = self.checkpoint.sources(layer, matrix)  # a circuit has two factors
        layout += tuple(other.cache_material() for other in others)
        experts = self.checkpoint.experts.get((layer, matrix))
        if experts is not None:  # which slices of the tensors are the experts' matrices
            stored = experts.matrix
            layout += (stored.per_expert, stored.transposed, stored.part, stored.interleaved)
        return entry_key(first, layout, f"{self.precision}/{ALGORITHM}")

    def _with_builtin_metrics(self, spectra: SliceSpectra, layer: int, unit: Unit) -> SliceSpectra:
        """The spectra plus the built-in metric columns, for the cache.

        Only metrics of this package: a conftest's metric may change without the cache knowing.
        """
        context = self._context(layer, unit, spectra.floor)
        columns = {
            request.key: np.asarray(_column(request, spectra.singular_values, context))
            for request in self.requests
            if METRICS.get(request.name) is request.spec
        }
        return dataclasses.replace(spectra, metrics=columns)

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
        geometry, layout = self.checkpoint.geometry_at(layer), self.checkpoint.layout_at(layer)
        if scope == "head":
            return head_blocks(weight, matrix, geometry, layout)
        return whole_matrix(weight, matrix, geometry, layout)[None]

    def _circuit_factors(self, layer: int, circuit: str) -> tuple[CircuitFactors, CircuitFactors]:
        from pytest_spectral.compute.circuits import read_circuit_factors

        return read_circuit_factors(self._reader(), self.checkpoint, layer, circuit)

    def _start_decomposition(self, blocks: torch.Tensor) -> PendingSpectra:
        """Torch computes only here and in :meth:`_start_circuits`: a run served from the
        cache never imports it."""
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

        if self._slice_pool is None:
            self.device = resolve_device(self.device, self.precision)
            self._slice_pool = slice_executor(max(1, self.threads or default_threads()))
        return self._slice_pool

    def _dtype(self) -> torch.dtype:
        import torch

        return torch.float64 if self.precision == "float64" else torch.float32


@dataclasses.dataclass(frozen=True)
class _Started:
    """A unit on its way: its cache key, and either the cached spectra or the pending work."""

    key: str | None
    cached: SliceSpectra | None
    pending: PendingSpectra | Future[SliceSpectra] | None


def _cause(exc: BaseException) -> str:
    """An exception as a reader can act on it: its text, and its kind where the text is terse."""
    text = str(exc).strip()
    if isinstance(exc, (OSError, UnitError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _column(request: MetricRequest, values: np.ndarray, context: MetricContext) -> list[float]:
    """One value per slice, or an error naming the metric that misbehaved."""
    try:
        column = np.asarray(request.compute(values, context), dtype=np.float64)
    except Exception as exc:
        raise MetricError(f"metric {request.key!r} failed: {type(exc).__name__}: {exc}") from None
    if column.shape != values.shape[:1]:
        raise MetricError(
            f"metric {request.key!r} returned shape {list(column.shape)} for {values.shape[0]} "
            "slices; it must reduce the last axis (one value per slice)"
        )
    return column.tolist()
