"""Serving per-head spectra to items: one batched computation per layer, ahead of need.

Items ask for one head at a time, but computing a head alone would read its tensor once per
head. The engine computes every head of a layer's matrices in one batch (reading each tensor
once), keeps only the layers in use, and in a single process computes the next layer on a
background thread while pytest runs the current layer's items: torch releases the GIL, so
the two overlap on separate cores.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from pytest_spectral.checkpoints.checkpoint import MATRICES, Checkpoint
from pytest_spectral.compute.cache import SpectraCache, entry_key
from pytest_spectral.judging.metrics import METRICS, MetricContext, MetricRequest, measurement_floor
from pytest_spectral.results import HeadSpectrum, LayerStats, SliceSpectra

if TYPE_CHECKING:
    from pytest_spectral.checkpoints.reader import WeightReader

#: (matrix, scope) -> one spectrum per distinct head ("head"), or a single one ("matrix")
LayerResults = dict[tuple[str, str], list[HeadSpectrum]]
Unit = tuple[str, str]


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
        self._futures: dict[int, Future[tuple[LayerResults, LayerStats]]] = {}
        self._consumed: set[int] = set()

    def plan(self, needed: Sequence[tuple[int, str, str]]) -> None:
        """Declare which (layer, matrix, scope) triples will be asked for, in run order.

        Only those tensors are read; without a plan every head matrix of a requested layer is.
        """
        plan: dict[int, dict[Unit, None]] = {}
        for layer, matrix, scope in needed:
            plan.setdefault(layer, {})[(matrix, scope)] = None
        self._plan = {layer: tuple(units) for layer, units in plan.items()}
        if self.prefetch and self._plan:
            # Start on the first layer (and torch's import) while pytest finishes starting up.
            self._submit(next(iter(self._plan)))

    def head(self, layer: int, matrix: str, head: int) -> HeadSpectrum:
        """The spectrum of query head ``head`` (its shared K/V head for k and v)."""
        geometry = self.checkpoint.geometry
        index = geometry.kv_head_of(head) if matrix in ("k", "v") else head
        return self._unit(layer, (matrix, "head"))[index]

    def whole(self, layer: int, matrix: str) -> HeadSpectrum:
        """The spectrum of the whole matrix (q, k, v, o or an MLP matrix) of ``layer``."""
        return self._unit(layer, (matrix, "matrix"))[0]

    def _unit(self, layer: int, unit: Unit) -> list[HeadSpectrum]:
        results = self._layer(layer)
        if unit not in results:  # asked for outside the plan
            results[unit] = self._matrix(layer, unit)[0]
            if self._reader_instance is not None:  # its tensor is not held for a later layer
                self._reader_instance.release(self.checkpoint.tensors[(layer, unit[0])])
        return results[unit]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _layer(self, layer: int) -> LayerResults:
        future = self._futures.get(layer) or self._submit(layer)
        results, stats = future.result()
        if layer not in self._consumed:
            self._consumed.add(layer)
            upcoming = self._next_planned(layer)
            for stale in [k for k in self._futures if k not in (layer, upcoming)]:
                del self._futures[stale]
            if self.prefetch and upcoming is not None and upcoming not in self._futures:
                self._submit(upcoming)
            if self.on_layer:
                self.on_layer(stats)
        return results

    def _submit(self, layer: int) -> Future[tuple[LayerResults, LayerStats]]:
        future = self._executor.submit(self._compute_layer, layer)
        self._futures[layer] = future
        return future

    def _next_planned(self, layer: int) -> int | None:
        layers = list(self._plan)
        if layer in self._plan and layers.index(layer) + 1 < len(layers):
            return layers[layers.index(layer) + 1]
        return None

    def _compute_layer(self, layer: int) -> tuple[LayerResults, LayerStats]:
        start = time.perf_counter()
        results: LayerResults = {}
        slices = direct = cached = 0
        units = self._plan.get(layer, tuple((m, "head") for m in MATRICES))
        for unit in units:
            heads, from_cache = self._matrix(layer, unit)
            results[unit] = heads
            slices += len(heads)
            direct += sum(h.method != "gram" for h in heads)
            cached += from_cache
        if self._reader_instance is not None:
            # Once per layer, not per matrix: a fused Q/K/V tensor serves three units.
            for matrix in dict.fromkeys(matrix for matrix, _ in units):
                self._reader_instance.release(self.checkpoint.tensors[(layer, matrix)])
        stats = LayerStats(layer, slices, direct, cached, time.perf_counter() - start)
        return results, stats

    def _matrix(self, layer: int, unit: Unit) -> tuple[list[HeadSpectrum], bool]:
        spectra, from_cache = self._spectra(layer, unit)
        values = spectra.singular_values
        context = self._context(layer, unit)
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
        heads = [
            HeadSpectrum(
                singular_values=row,
                metrics={key: column[i] for key, column in metrics.items()},
                nonfinite=spectra.nonfinite[i],
                method=spectra.methods[i],
                floor_limited=bool(limited[i]),
            )
            for i, row in enumerate(values.tolist())
        ]
        return heads, from_cache

    def _context(self, layer: int, unit: Unit) -> MetricContext:
        matrix, scope = unit
        return MetricContext(
            self.checkpoint.item_shape(matrix, whole=scope == "matrix"),
            self.checkpoint.tensors[(layer, matrix)].dtype,
        )

    def _spectra(self, layer: int, unit: Unit) -> tuple[SliceSpectra, bool]:
        if self.cache is None:
            return self._decompose(layer, unit), False
        matrix, scope = unit
        g, stored = self.checkpoint.geometry, self.checkpoint.layout
        layout = (matrix, scope, g.heads, g.kv_heads, g.head_dim, stored.fused, stored.conv1d)
        key = entry_key(self.checkpoint.tensors[(layer, matrix)], layout, self.precision)
        hit = self.cache.load(key)
        if hit is not None:
            return hit, True
        spectra = self._with_builtin_metrics(self._decompose(layer, unit), layer, unit)
        self.cache.store(key, spectra)
        return spectra, False

    def _with_builtin_metrics(self, spectra: SliceSpectra, layer: int, unit: Unit) -> SliceSpectra:
        """The spectra plus the built-in metric columns, for the cache.

        Only metrics of this package: a conftest's metric may change without the cache knowing.
        """
        context = self._context(layer, unit)
        columns = {
            request.key: np.asarray(_column(request, spectra.singular_values, context))
            for request in self.requests
            if METRICS.get(request.name) is request.spec
        }
        return dataclasses.replace(spectra, metrics=columns)

    def _decompose(self, layer: int, unit: Unit) -> SliceSpectra:
        """The only place torch is needed: a run served from the cache never imports it."""
        import torch

        from pytest_spectral.checkpoints.reader import WeightReader
        from pytest_spectral.compute.device import resolve_device
        from pytest_spectral.compute.spectra import head_blocks, slice_singular_values, whole_matrix

        if self._reader_instance is None:
            if self.threads:
                torch.set_num_threads(self.threads)
            self.device = resolve_device(self.device, self.precision)
            self._reader_instance = WeightReader()
        matrix, scope = unit
        entry = self.checkpoint.tensors[(layer, matrix)]
        weight = self._reader_instance.tensor(entry)
        geometry, layout = self.checkpoint.geometry, self.checkpoint.layout
        if scope == "head":
            blocks = head_blocks(weight, matrix, geometry, layout)
        else:
            blocks = whole_matrix(weight, matrix, geometry, layout)[None]
        dtype = torch.float64 if self.precision == "float64" else torch.float32
        return slice_singular_values(blocks, device=self.device, dtype=dtype)


class MetricError(ValueError):
    """A metric function (typically a user's) that failed or returned the wrong shape."""


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
