"""Serving per-head spectra to items: one batched computation per layer, ahead of need.

Items ask for one head at a time, but computing a head alone would read its tensor once per
head. The engine computes every head of a layer's matrices in one batch (reading each tensor
once), keeps only the layers in use, and in a single process computes the next layers in the
background while pytest runs the current layer's items.

A layer goes through two stages, each on a thread of its own so that they overlap: *start*
(serve what the cache holds, hand the rest to a decomposer, which reads it and starts
decomposing it) and *finish* (wait for the decomposer, store its spectra in the cache, build
each head's record). The decomposer (:mod:`pytest_spectral.compute.decomposer`) runs on
threads of this process or, with ``isolate``, in a child process
(:mod:`pytest_spectral.compute.isolated`); either way values never depend on the number of
threads or workers (see :mod:`pytest_spectral.compute.spectra`).

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

from pytest_spectral.checkpoints.checkpoint import MATRICES, Checkpoint
from pytest_spectral.checkpoints.families import matrix_kind, split_expert_item
from pytest_spectral.compute.cache import SpectraCache, entry_key
from pytest_spectral.compute.units import (
    MetricError,
    Unit,
    UnitError,
    describe,
    metric_column,
    metric_context,
    read_failure,
)
from pytest_spectral.judging.metrics import MetricRequest, measurement_floor
from pytest_spectral.results import HeadSpectrum, LayerStats, SliceSpectra

if TYPE_CHECKING:
    from pytest_spectral.compute.decomposer import Decomposed, LocalDecomposer
    from pytest_spectral.compute.isolated import ChildDecomposer

__all__ = ["ALGORITHM", "LAYERS_AHEAD", "MetricError", "SpectraEngine", "UnitError"]

#: Layers computed ahead of the one whose items run (a single process only). More than one:
#: pytest's items and the decomposition then never wait for each other at a layer boundary.
LAYERS_AHEAD = 2
#: Bump when the decomposition's routes or their numbers change (part of the cache key).
ALGORITHM = "gram/cholqr2/qr-1"

#: Each unit of a layer: its spectra with every requested metric, or the error that stopped it
LayerResults = dict[Unit, list[HeadSpectrum] | UnitError]


@dataclasses.dataclass(frozen=True)
class _Begun:
    """A layer's units on their way: the cache's answers and keys, and the decomposer's work
    on the rest."""

    layer: int
    time: float
    units: tuple[Unit, ...]
    keys: dict[Unit, str]  # cache keys (none without a cache)
    cached: dict[Unit, SliceSpectra | UnitError]
    pending: Future[Decomposed] | None


class SpectraEngine:
    """Per-head and whole-matrix spectra of a checkpoint, computed a layer at a time.

    ``prefetch`` computes the planned layers ahead of the items (a single process);
    ``isolate`` decomposes in a child process (see :mod:`pytest_spectral.compute.isolated`).
    """

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
        isolate: bool = False,
        on_layer: Callable[[LayerStats], None] | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.requests = tuple(requests)
        self.device = device
        self.precision = precision
        self.threads = threads
        self.cache = cache
        self.prefetch = prefetch
        self.isolate = isolate
        self.on_layer = on_layer
        self._decomposer_instance: LocalDecomposer | ChildDecomposer | None = None
        self._plan: dict[int, tuple[Unit, ...]] = {}
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pytest-spectral-read")
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pytest-spectral")
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
            # Start on the first layer (and the decomposer) while pytest finishes starting up.
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

    def close(self) -> None:
        self._starter.shutdown(wait=True, cancel_futures=True)
        self._finisher.shutdown(wait=True, cancel_futures=True)
        if self._decomposer_instance is not None:
            self._decomposer_instance.close()

    def _unit(self, layer: int, unit: Unit) -> list[HeadSpectrum]:
        results = self._layer(layer)
        if unit not in results:  # asked for outside the plan
            results[unit] = self._finish(self._begin(layer, (unit,)))[0][unit]
        served = results[unit]
        if isinstance(served, UnitError):
            raise served
        return served

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
        units = self._plan.get(layer, tuple((m, "head") for m in MATRICES))
        begun = self._starter.submit(self._begin, layer, units)
        future = self._finisher.submit(self._finish_layer, layer, begun)
        self._futures[layer] = future
        return future

    def _next_planned(self, layer: int) -> list[int]:
        """The planned layers after ``layer`` that are computed ahead of the items."""
        layers = list(self._plan)
        if layer not in self._plan:
            return []
        start = layers.index(layer) + 1
        return layers[start : start + LAYERS_AHEAD]

    def _begin(self, layer: int, units: tuple[Unit, ...]) -> _Begun:
        """Serve ``units`` from the cache where it can; hand the rest to the decomposer (all
        at once, so that it shares every slice of the layer among its threads)."""
        begun = time.perf_counter()
        keys: dict[Unit, str] = {}
        cached: dict[Unit, SliceSpectra | UnitError] = {}
        for unit in units:
            if self.cache is None:
                continue
            try:
                keys[unit] = key = self._cache_key(layer, unit)
                hit = self.cache.load(key)
            except Exception as exc:
                cached[unit] = read_failure(self.checkpoint, layer, unit, exc)
                continue
            if hit is not None:
                cached[unit] = hit
        missing = [unit for unit in units if unit not in cached]
        pending = None
        if missing:
            try:
                pending = self._decomposer().start(layer, missing)
            except Exception as exc:  # e.g. a child process that could not be started
                failure = UnitError(f"cannot start decomposing: {describe(exc)}")
                cached.update(dict.fromkeys(missing, failure))
        return _Begun(layer, begun, units, keys, cached, pending)

    def _finish_layer(self, layer: int, started: Future[_Begun]) -> tuple[LayerResults, LayerStats]:
        begun = started.result()
        results, cached = self._finish(begun)
        slices = refined = 0
        for heads in results.values():
            if isinstance(heads, list):
                slices += len(heads)
                refined += sum(h.method in ("cholqr2", "qr") for h in heads)
        elapsed = time.perf_counter() - begun.time
        return results, LayerStats(layer, slices, refined, cached, elapsed)

    def _finish(self, begun: _Begun) -> tuple[LayerResults, int]:
        """Each unit's heads, or the error that stopped it, and how many came from the cache.

        Computed spectra are stored in the cache here, built-in metric columns included.
        """
        layer = begun.layer
        decomposed: Decomposed = {}
        if begun.pending is not None:
            try:
                decomposed = begun.pending.result()
            except Exception as exc:  # the whole batch failed (a child process that died)
                failure = UnitError(describe(exc))
                decomposed = {unit: failure for unit in begun.units if unit not in begun.cached}
        results: LayerResults = {}
        for unit in begun.units:
            spectra = begun.cached[unit] if unit in begun.cached else decomposed[unit]
            if isinstance(spectra, UnitError):
                results[unit] = spectra
                continue
            if unit not in begun.cached and self.cache is not None and unit in begun.keys:
                self.cache.store(begun.keys[unit], spectra)
            try:
                results[unit] = self._heads(layer, unit, spectra)
            except UnitError as exc:
                results[unit] = exc
        cached = sum(1 for s in begun.cached.values() if not isinstance(s, UnitError))
        return results, cached

    def _heads(self, layer: int, unit: Unit, spectra: SliceSpectra) -> list[HeadSpectrum]:
        values = spectra.singular_values
        context = metric_context(self.checkpoint, layer, unit, spectra.floor)
        metrics = {
            request.key: (
                spectra.metrics[request.key].tolist()
                if request.key in spectra.metrics
                else metric_column(request, values, context)
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

    def _decomposer(self) -> LocalDecomposer | ChildDecomposer:
        """The decomposer, started on the first unit the cache cannot serve: a run served
        from the cache neither imports torch nor starts a child process."""
        if self._decomposer_instance is None:
            if self.isolate:
                from pytest_spectral.compute.isolated import ChildDecomposer

                kind: type[LocalDecomposer | ChildDecomposer] = ChildDecomposer
            else:
                from pytest_spectral.compute.decomposer import LocalDecomposer

                kind = LocalDecomposer
            self._decomposer_instance = kind(
                self.checkpoint,
                self.requests,
                device=self.device,
                precision=self.precision,
                threads=self.threads,
            )
        return self._decomposer_instance
