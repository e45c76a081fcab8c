"""The history page: how a training run's heads changed from checkpoint to checkpoint.

Drawn from a :class:`~pytest_spectral.reporting.history.table.HistoryTable` with matplotlib,
as PNGs embedded in one self-contained page, like the HTML report (which includes these
sections when a run is given ``--spectral-history``). Every text taken from a report (labels,
file names, node ids, rule names) is escaped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pytest_spectral.checkpoints.checkpoint import MATRICES
from pytest_spectral.judging.metrics import METRICS
from pytest_spectral.judging.rules import Rule
from pytest_spectral.reporting.history.table import HistoryTable, curves, trend_breaks
from pytest_spectral.reporting.html_report import (
    HEATMAP_METRICS,
    _img,
    _section,
    _text,
    require_matplotlib,
)

#: Metrics drawn when none are asked for: the heatmap's, plus those of the trend rules.
DEFAULT_METRICS = HEATMAP_METRICS
#: Heads listed as having moved most, per metric.
MOVED_HEADS = 8
#: Failing heads whose singular values are drawn across steps (the rest are listed).
MAX_CURVE_HEADS = 12


@dataclass(frozen=True)
class FailingHead:
    """A head item that failed in some report or broke a trend rule across the history."""

    column: int
    first: int  # index of the first report where it failed
    reports: int  # how many reports it failed in
    why: str  # "failed in the report", or the trend rule it broke


def history_metrics(metrics: Sequence[str], rules: Sequence[Rule]) -> list[str]:
    """The metric keys a history reads: those asked for (default :data:`DEFAULT_METRICS`)
    and those of the trend rules."""
    trend = [r.request.key for r in rules if r.is_trend]
    return list(dict.fromkeys([*(metrics or DEFAULT_METRICS), *trend]))


def failing_heads(table: HistoryTable, rules: Sequence[Rule]) -> list[FailingHead]:
    """Head items that failed in a report or broke a trend rule, first to fail first."""
    failed = table.failed()
    reasons: dict[tuple[int, int], str] = {
        (int(i), int(c)): "failed in the report" for i, c in zip(*np.nonzero(failed), strict=True)
    }
    for where, rule in trend_breaks(table, rules).items():
        held = reasons.get(where)
        reasons[where] = f"{held}; trend rule {rule}" if held else f"trend rule {rule}"
    by_column: dict[int, list[int]] = {}
    for report, column in sorted(reasons):
        by_column.setdefault(column, []).append(report)
    heads = [
        FailingHead(column, reports[0], len(reports), reasons[(reports[0], column)])
        for column, reports in by_column.items()
        if table.places[column].head is not None
    ]
    return sorted(heads, key=lambda h: (h.first, table.nodeids[h.column]))


def history_sections(
    table: HistoryTable, metrics: Sequence[str], rules: Sequence[Rule] = ()
) -> list[str]:
    """The history's sections of a page: the reports, the failing heads, then per metric the
    layers' median and worst head over steps and the heads that moved most, then the
    failing heads' singular values across steps."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    failing = failing_heads(table, rules)
    sections = [
        _section("Training history: reports", _reports_table(table)),
        _section("Training history: failing heads", _failing_table(table, failing)),
    ]
    for metric in metrics:
        if metric not in table.values or not table.present[metric].any():
            continue
        sections.append(
            _section(
                f"{metric} over steps: each layer's median and worst head",
                _img(_layer_figure(table, metric), f"{metric} per layer over steps")
                + f'<p class="legend">{_LAYER_WORDS} {_text(_bad_words(metric))}</p>',
            )
        )
        moved = _moved_most(table, metric)
        if moved:
            sections.append(
                _section(
                    f"{metric}: the heads that moved most",
                    _moved_table(table, metric, moved)
                    + _img(_moved_figure(table, metric, moved), f"{metric}, heads that moved most")
                    + f'<p class="legend">{_MOVED_WORDS}</p>',
                )
            )
    drawn = failing[:MAX_CURVE_HEADS]
    if drawn:
        values = curves(table, [table.nodeids[h.column] for h in drawn])
        sections.append(
            _section(
                "Singular values of the failing heads across steps",
                _img(_curve_figure(table, drawn, values), "failing heads' singular values")
                + f'<p class="legend">{_CURVE_WORDS}</p>',
            )
        )
    return sections


_LAYER_WORDS = (
    "One panel per matrix; one colour per layer (dark to light: first to last layer). The "
    "solid line is the median over the layer's heads, the dotted line of the same colour the "
    "head furthest on the metric's bad side, at each step."
)
_MOVED_WORDS = (
    "Each line is one head's value over steps; the heads are those whose value moved "
    "furthest, relative to their first report, at any step."
)
_CURVE_WORDS = (
    "One panel per failing head: its singular values by index (log scale), one line per "
    "report, coloured from dark (first step) to light (last step); the thick line is the "
    "first report where the head failed."
)


def _bad_words(metric: str) -> str:
    spec = METRICS.get(metric.split("(")[0])
    bad = spec.bad if spec is not None else None
    side = {"high": "high values", "low": "low values", "both": "both extremes"}.get(bad or "")
    return (
        f"Worst means furthest towards {side}." if side else "Worst means furthest from the median."
    )


def _steps(table: HistoryTable) -> tuple[np.ndarray, bool]:
    """The x coordinates: step numbers when every report has one, else positions."""
    numbers = [h.step.number if h.step is not None else None for h in table.headers]
    if all(n is not None for n in numbers):
        return np.array(numbers, dtype=np.float64), True
    return np.arange(len(numbers), dtype=np.float64), False


def _x_axis(axis, table: HistoryTable, numbered: bool) -> None:
    if numbered:
        axis.set_xlabel("step")
        return
    from matplotlib.ticker import FixedLocator

    labels = table.labels
    every = max(1, len(labels) // 12)
    axis.xaxis.set_major_locator(FixedLocator(list(range(0, len(labels), every))))
    axis.set_xticklabels([labels[i][:16] for i in range(0, len(labels), every)], rotation=30)
    axis.set_xlabel("report")


def worst(values: np.ndarray, metric: str) -> np.ndarray:
    """Per row of [reports, heads]: the value furthest on the metric's bad side (the largest
    for ``bad="high"``, the smallest for ``"low"``, else the furthest from the row's median);
    non-finite values are left out, and a row without a finite one is nan."""
    spec = METRICS.get(metric.split("(")[0])
    bad = spec.bad if spec is not None else None
    finite = np.where(np.isfinite(values), values, np.nan)
    with warnings.catch_warnings():  # a report without the layer: an all-nan row
        warnings.simplefilter("ignore", RuntimeWarning)
        if bad == "high":
            return np.nanmax(finite, axis=1)
        if bad == "low":
            return np.nanmin(finite, axis=1)
        median = np.nanmedian(finite, axis=1, keepdims=True)
    distance = np.abs(finite - median)
    distance[np.isnan(distance)] = -1
    return finite[np.arange(len(finite)), np.argmax(distance, axis=1)]


def layer_series(
    table: HistoryTable, metric: str, matrix: str, layer: int, stack: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The layer's median over its head items of ``matrix`` and its worst head's value (see
    :func:`worst`), one per report: what the layer plot draws. Non-finite values are left
    out; nan where a report has none."""
    columns = [
        c
        for c, p in enumerate(table.places)
        if p.matrix == matrix and p.layer == layer and p.stack == stack and p.head is not None
    ]
    block = np.where(table.present[metric], table.values[metric], np.nan)[:, columns]
    finite = np.where(np.isfinite(block), block, np.nan)
    with warnings.catch_warnings():  # a report without the layer: an all-nan row
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(finite, axis=1)
    return median, worst(finite, metric)


def _layer_figure(table: HistoryTable, metric: str):
    import matplotlib.pyplot as plt

    steps, numbered = _steps(table)
    present = {p.matrix for p in table.places if p.head is not None}
    matrices = [m for m in MATRICES if m in present] + sorted(present - set(MATRICES))
    stacks = list(dict.fromkeys(p.stack for p in table.places))
    layers = sorted(
        {(stacks.index(p.stack), p.layer, p.stack) for p in table.places if p.head is not None}
    )
    figure, axes = plt.subplots(
        1, max(1, len(matrices)), figsize=(3.6 * max(1, len(matrices)), 3.4),
        constrained_layout=True, squeeze=False,
    )  # fmt: skip
    colours = plt.get_cmap("viridis")
    for axis, matrix in zip(axes[0], matrices, strict=False):
        for rank, (_, layer, stack) in enumerate(layers):
            median, worst = layer_series(table, metric, matrix, layer, stack)
            colour = colours(rank / max(1, len(layers) - 1) * 0.9)
            label = f"layer {layer}" if stack is None else f"{stack} layer {layer}"
            axis.plot(steps, median, color=colour, linewidth=1.2, marker=".", label=label)
            axis.plot(steps, worst, color=colour, linewidth=1.0, linestyle=":")
        axis.set_title(matrix)
        axis.set_ylabel(metric)
        if METRICS.get(metric.split("(")[0]) and METRICS[metric.split("(")[0]].log_scale:
            axis.set_yscale("log")
        _x_axis(axis, table, numbered)
    if len(layers) <= 8:
        axes[0][0].legend(fontsize=7)
    return figure


def _moved_most(table: HistoryTable, metric: str) -> list[tuple[int, float, int]]:
    """(column, relative change from the first value where it is largest in size, report
    index of it) of the head items that moved most, most first."""
    values = np.where(table.present[metric], table.values[metric], np.nan)
    moved = []
    for column, place in enumerate(table.places):
        if place.head is None:
            continue
        series = values[:, column]
        finite = np.flatnonzero(np.isfinite(series))
        if len(finite) < 2 or series[finite[0]] == 0:
            continue
        first = series[finite[0]]
        change = (series[finite] - first) / abs(first)
        best = int(np.argmax(np.abs(change)))
        if change[best] != 0:
            moved.append((column, float(change[best]), int(finite[best])))
    moved.sort(key=lambda m: (-abs(m[1]), table.nodeids[m[0]]))
    return moved[:MOVED_HEADS]


def _moved_table(table: HistoryTable, metric: str, moved: Sequence[tuple[int, float, int]]) -> str:
    values = np.where(table.present[metric], table.values[metric], np.nan)
    rows = []
    for column, change, index in moved:
        series = values[:, column]
        first = int(np.flatnonzero(np.isfinite(series))[0])
        rows.append(
            f"<tr><td>{_text(table.nodeids[column])}</td>"
            f"<td>{series[first]:.4g} (step {_text(table.labels[first])})</td>"
            f"<td>{series[index]:.4g} (step {_text(table.labels[index])})</td>"
            f"<td>{change:+.1%}</td><td>{series[-1]:.4g}</td></tr>"
        )
    header = (
        "<tr><th>item</th><th>first value</th><th>furthest value</th>"
        "<th>largest change</th><th>last value</th></tr>"
    )
    return f'<table class="moved">{header}{"".join(rows)}</table>'


def _moved_figure(table: HistoryTable, metric: str, moved: Sequence[tuple[int, float, int]]):
    import matplotlib.pyplot as plt

    steps, numbered = _steps(table)
    values = np.where(table.present[metric], table.values[metric], np.nan)
    figure, axis = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    for column, _, _ in moved:
        axis.plot(steps, values[:, column], marker=".", label=_short(table.nodeids[column]))
    axis.set_ylabel(metric)
    _x_axis(axis, table, numbered)
    axis.legend(fontsize=7)
    return figure


def _short(nodeid: str) -> str:
    """``layer03::head17-q`` of ``spectral::layer03::head17-q``."""
    return "::".join(nodeid.split("::")[-2:])


def _curve_figure(
    table: HistoryTable,
    heads: Sequence[FailingHead],
    values: Mapping[str, list[np.ndarray | None]],
):
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    count = len(heads)
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 3.0 * rows), constrained_layout=True, squeeze=False
    )
    colours = plt.get_cmap("viridis")
    norm = Normalize(0, max(1, len(table.headers) - 1))
    for axis, head in zip(axes.flat, heads, strict=False):
        nodeid = table.nodeids[head.column]
        for index, spectrum in enumerate(values[nodeid]):
            if spectrum is None or not len(spectrum):
                continue
            shown = np.where(spectrum > 0, spectrum, np.nan)
            axis.plot(
                shown,
                color=colours(norm(index) * 0.9),
                linewidth=2.4 if index == head.first else 1.0,
            )
        axis.set_yscale("log")
        axis.set_title(_short(nodeid), fontsize=9)
        axis.set_xlabel("index")
        axis.set_ylabel("singular value")
    for axis in list(axes.flat)[count:]:
        axis.set_visible(False)
    bar = figure.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=colours), ax=list(axes.flat), shrink=0.8
    )
    bar.set_label("report (first to last)")
    return figure


def _reports_table(table: HistoryTable) -> str:
    failed = table.failed().sum(axis=1)
    held = (table.outcomes >= 0).sum(axis=1)
    rows = "".join(
        f"<tr><td>{_text(h.label)}</td>"
        f"<td>{_text(h.step.source if h.step else 'none: ordered by creation time')}</td>"
        f"<td>{_text(h.source.name)}</td><td>{_text(h.created)}</td>"
        f"<td>{int(held[i]):,}</td><td>{int(failed[i]):,}</td></tr>"
        for i, h in enumerate(table.headers)
    )
    header = (
        "<tr><th>step</th><th>step from</th><th>report</th><th>created</th>"
        "<th>items</th><th>failed</th></tr>"
    )
    return f'<table class="reports">{header}{rows}</table>'


def _failing_table(table: HistoryTable, heads: Sequence[FailingHead]) -> str:
    if not heads:
        return "<p>No head failed in any report or broke a trend rule.</p>"
    rows = "".join(
        f"<tr><td>{_text(table.nodeids[h.column])}</td>"
        f"<td>{_text(table.labels[h.first])}</td><td>{h.reports}</td><td>{_text(h.why)}</td>"
        f"<td>{'yes' if i < MAX_CURVE_HEADS else 'no'}</td></tr>"
        for i, h in enumerate(heads)
    )
    header = (
        "<tr><th>item</th><th>first failing step</th><th>reports failed</th>"
        "<th>first failure</th><th>curves drawn</th></tr>"
    )
    return f'<table class="failing">{header}{rows}</table>'
