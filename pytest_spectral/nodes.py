"""The collection tree: ``spectral`` / ``layerNN`` / ``headNN-m`` items.

One collector per layer, with that layer's items as its direct children, so that
``pytest -n auto --dist loadscope`` keeps a layer on one worker and each worker reads only
its own layers. Node ids carry no model id, so ``--lf`` and baselines work across checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pytest_spectral.checkpoints.slices import slice_span
from pytest_spectral.compute.engine import UnitError
from pytest_spectral.errors import SpectralRuleWarning
from pytest_spectral.judging.evaluation import Verdict, judge
from pytest_spectral.reporting.report import Record, item_record
from pytest_spectral.results import HeadSpectrum
from pytest_spectral.run import RUN_KEY, SpectralRun

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr, TracebackStyle

ROOT_NAME = "spectral"
_TOP_VALUES_SHOWN = 8


class SpectralCheckError(Exception):
    """Raised by an item whose head broke a rule; its text is the whole failure report."""


def _headline(spectrum: HeadSpectrum, verdict: Verdict) -> str:
    """One line for pytest's short summary: what is wrong, most important first."""
    parts = []
    if verdict.status == "nonfinite":
        parts.append(f"{spectrum.nonfinite} non-finite weights")
    elif verdict.status == "zero_matrix":
        parts.append("zero matrix")
    parts.extend(b.describe() for b in verdict.broken if b.severity == "fail")
    parts.extend(f"{b.describe()} (warn)" for b in verdict.broken if b.severity == "warn")
    return "; ".join(parts)


class SpectralRoot(pytest.Collector):
    """Top-level collector appended to the session when ``--spectral-model`` is given.

    It carries the ``spectral`` marker: items inherit it (``-m spectral`` selects them all)
    without a marker object per item.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.add_marker("spectral")

    def collect(self) -> Iterator[pytest.Collector]:
        run = self.config.stash[RUN_KEY]
        width = max(2, len(str(run.checkpoint.geometry.layers - 1)))
        for layer in run.layers:
            yield LayerCollector.from_parent(self, name=f"layer{layer:0{width}d}", layer=layer)


class LayerCollector(pytest.Collector):
    def __init__(self, *, layer: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.layer = layer

    def collect(self) -> Iterator[pytest.Item]:
        """Whole-matrix items first (``layer03::q``), then head items (``layer03::head17-q``)."""
        run = self.config.stash[RUN_KEY]
        if "matrix" in run.scopes:
            for matrix in run.whole_matrices:
                yield SpectralItem.from_parent(
                    self, name=matrix, layer=self.layer, head=None, matrix=matrix
                )
        if "head" not in run.scopes:
            return
        heads = run.checkpoint.geometry.heads
        width = max(2, len(str(heads - 1)))
        for head in range(heads):
            for matrix in run.head_matrices:
                yield SpectralItem.from_parent(
                    self,
                    name=f"head{head:0{width}d}-{matrix}",
                    layer=self.layer,
                    head=head,
                    matrix=matrix,
                )


class SpectralItem(pytest.Item):
    """One (layer, head, matrix), or a whole (layer, matrix) when ``head`` is None.

    It computes nothing itself: it asks the run's engine, which batches per layer.
    """

    def __init__(self, *, layer: int, head: int | None, matrix: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.layer, self.head, self.matrix = layer, head, matrix
        self.record: Record | None = None

    @property
    def scope(self) -> str:
        return "matrix" if self.head is None else "head"

    def runtest(self) -> None:
        run = self.config.stash[RUN_KEY]
        try:
            engine = run.engine()
            spectrum = (
                engine.whole(self.layer, self.matrix)
                if self.head is None
                else engine.head(self.layer, self.matrix, self.head)
            )
        except UnitError as exc:  # names its own tensor and cause
            raise SpectralCheckError(str(exc)) from None
        verdict = judge(
            run.rules.rules,
            self.layer,
            self.head,
            self.matrix,
            spectrum,
            baseline=run.baseline.for_item(self.nodeid) if run.baseline else None,
            warn_only=run.warn_only,
        )
        geometry = run.checkpoint.geometry
        shared = self.head is not None and self.matrix in ("k", "v")
        self.record = item_record(
            nodeid=self.nodeid,
            layer=self.layer,
            head=self.head,
            matrix=self.matrix,
            kv_head=geometry.kv_head_of(self.head) if shared else None,  # type: ignore[arg-type]
            shape=run.checkpoint.item_shape(self.matrix, whole=self.head is None),
            spectrum=spectrum,
            verdict=verdict,
        )
        self.user_properties.extend(spectrum.metrics.items())
        if verdict.outcome == "failed":
            raise SpectralCheckError(self._describe(run, spectrum, verdict))
        if verdict.outcome == "warned":
            warnings.warn_explicit(
                SpectralRuleWarning(self._describe(run, spectrum, verdict)),
                SpectralRuleWarning,
                filename=self.nodeid,
                lineno=0,
            )

    def _describe(self, run: SpectralRun, spectrum: HeadSpectrum, verdict: Verdict) -> str:
        lines = [_headline(spectrum, verdict), self._where(run)]
        if verdict.status == "nonfinite":
            lines.append(
                f"  FAIL non-finite weights: {spectrum.nonfinite} NaN/Inf values in this slice "
                "(corrupt file or diverged training)"
            )
        elif verdict.status == "zero_matrix":
            lines.append(
                "  FAIL zero matrix: every weight of this slice is 0, ratios are undefined"
            )
        for broken in verdict.broken:
            lines.append(f"  {broken.severity.upper():4} {broken.describe()}")
        if verdict.status != "nonfinite":
            top = spectrum.singular_values[:_TOP_VALUES_SHOWN]
            shown = ", ".join(f"{v:.4g}" for v in top)
            lines.append(
                f"  top singular values ({len(top)} of {len(spectrum.singular_values)}): {shown}"
            )
        return "\n".join(lines)

    def _where(self, run: SpectralRun) -> str:
        g = run.checkpoint.geometry
        entry = run.checkpoint.tensors[(self.layer, self.matrix)]
        if self.head is None:
            m, n = run.checkpoint.item_shape(self.matrix, whole=True)
            fused = run.checkpoint.layout.fused and self.matrix in ("q", "k", "v")
            source = f"{self.matrix.upper()}'s share of fused {entry.name}" if fused else entry.name
            return f"layer {self.layer}, whole {self.matrix}: {source} ({m}x{n})"
        index = g.kv_head_of(self.head) if self.matrix in ("k", "v") else self.head
        axis, start, stop = slice_span(self.matrix, index, g, run.checkpoint.layout)
        part = f"{axis} {start}:{stop}"
        shared = ""
        if self.matrix in ("k", "v") and g.group_size > 1:
            first = index * g.group_size
            shared = f", KV head {index} shared by query heads {first}-{first + g.group_size - 1}"
        m, n = g.slice_shape(self.matrix)
        return (
            f"layer {self.layer}, head {self.head}, {self.matrix}: {part} of {entry.name} "
            f"({m}x{n}{shared})"
        )

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: TracebackStyle | None = None,
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, SpectralCheckError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[str, None, str]:
        where = f"head {self.head} " if self.head is not None else "whole "
        return ROOT_NAME, None, f"spectral layer {self.layer} {where}{self.matrix}"
