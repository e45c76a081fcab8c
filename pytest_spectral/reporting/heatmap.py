"""A terminal heatmap of one metric: layers down, heads across, one panel per matrix type.

One character per head keeps a 32 x 32 panel 37 columns wide, so two panels fit side by side
in 80 columns. Every panel shares one scale (:mod:`pytest_spectral.reporting.scale`): a
head is shaded by how far it has gone from the median towards the rules' bound on the bad
side (or 5 robust standard deviations without a rule), so a collapsed head stands out and
the healthy spread stays blank. Under the panels, each matrix's true range and its worst
head. With colour off, the shade characters alone carry the picture.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.text import Text

from pytest_spectral.checkpoints.checkpoint import MATRICES
from pytest_spectral.judging.metrics import Direction
from pytest_spectral.printable import printable
from pytest_spectral.reporting.report import Record
from pytest_spectral.reporting.scale import Bound, Scale, metric_scale

SHADES = " ░▒▓█"
#: badness at which each shade starts (the last: at or beyond the bound)
_LEVELS = (0.25, 0.5, 0.75, 1.0)
_COLOURS = ("default", "green", "yellow", "bright_red", "bold red")
_MISSING = "·"
_UNDEFINED = "x"


def render_heatmap(
    records: Sequence[Record],
    metric: str,
    *,
    layers: int,
    heads: int,
    width: int,
    color: bool,
    bad: Direction | None = None,
    bounds: Sequence[Bound] = (),
    log: bool = False,
) -> str:
    """The heatmap of ``metric`` (a key of the records' ``metrics``) as text.

    ``bad`` is the metric's bad side, ``bounds`` the rules' bounds on it and ``log`` whether
    to measure distances in log10 (see :func:`~pytest_spectral.reporting.scale.metric_scale`).
    """
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=max(width, 40),
        force_terminal=color,
        no_color=not color,
        color_system="standard" if color else None,
        highlight=False,
        markup=False,
        emoji=False,
    )
    grids = {m: g for m in MATRICES if (g := _grid(records, metric, m, layers, heads)) is not None}
    values = [v for values, _ in grids.values() for v in values[np.isfinite(values)].tolist()]
    scale = metric_scale(metric, values, bad=bad, bounds=bounds, log=log)
    console.print(
        printable(  # the legend names rules, from a file
            f"{metric} per head (rows: layers, columns: heads): {scale.legend()}. "
            f"Shade: share of the way there, ' ' under 25%, '░' 25-50%, '▒' 50-75%, "
            f"'▓' 75-100%, '█' at or beyond; '{_UNDEFINED}' undefined, '{_MISSING}' not "
            "collected."
        )
    )
    panels = [_panel(matrix, *grid, scale) for matrix, grid in grids.items()]
    panel_width = 5 + heads + 2
    per_row = max(1, console.width // panel_width)
    for start in range(0, len(panels), per_row):
        group = panels[start : start + per_row]
        for row in range(max(len(p) for p in group)):
            line = Text()
            for panel in group:
                line.append_text(panel[row] if row < len(panel) else Text(" " * (panel_width - 2)))
                line.append("  ")
            console.print(line, no_wrap=True, crop=False)
    for matrix, (grid, present) in grids.items():
        console.print(_range_line(matrix, grid, present, scale))
    return buffer.getvalue()


def _grid(
    records: Sequence[Record], metric: str, matrix: str, layers: int, heads: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The metric's values of the matrix's head items (nan where undefined or missing), and
    where there is an item."""
    grid = np.full((layers, heads), np.nan)
    present = np.zeros((layers, heads), dtype=bool)
    for record in records:
        if record["matrix"] != matrix or record["head"] is None:
            continue
        value = record["metrics"].get(metric)  # type: ignore[attr-defined]
        layer, head = int(record["layer"]), int(record["head"])  # type: ignore[call-overload]
        present[layer, head] = True
        grid[layer, head] = float(value) if value is not None else math.nan
    return (grid, present) if present.any() else None


def _panel(matrix: str, grid: np.ndarray, present: np.ndarray, scale: Scale) -> list[Text]:
    layers, heads = grid.shape
    lines = [Text(f"{matrix}".ljust(5 + heads), style="bold")]
    for layer in range(layers):
        if not present[layer].any():
            continue
        line = Text(f"{layer:>3}  ")
        for head in range(heads):
            value = grid[layer, head]
            if not present[layer, head]:
                line.append(_MISSING)
            elif not math.isfinite(value):
                line.append(_UNDEFINED, style="bold magenta")
            else:
                level = int(np.searchsorted(_LEVELS, scale.badness(value), side="right"))
                line.append(SHADES[level], style=_COLOURS[level])
        lines.append(line)
    return lines


def _range_line(matrix: str, grid: np.ndarray, present: np.ndarray, scale: Scale) -> str:
    """``q: 0.4224..0.9737; furthest: L1 H2 0.9737`` (the true range, and the head that has
    gone furthest on the scale)."""
    finite = present & np.isfinite(grid)
    undefined = int((present & ~np.isfinite(grid)).sum())
    if not finite.any():
        return f"{matrix}: no defined values"
    values = grid[finite]
    where = np.argwhere(finite)
    furthest = max(range(len(values)), key=lambda i: scale.badness(float(values[i])))
    layer, head = where[furthest]
    text = (
        f"{matrix}: {values.min():.4g}..{values.max():.4g}; furthest: "
        f"L{layer} H{head} {values[furthest]:.4g}"
    )
    return text + (f"; {undefined} undefined" if undefined else "")
