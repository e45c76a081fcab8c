"""A terminal heatmap of one metric: layers down, heads across, one panel per matrix type.

One character per head keeps a 32 x 32 panel 36 columns wide, so two panels fit side by side
in 80 columns. Shades are quantiles of the panel's own values, which shows structure whatever
the metric's scale; the legend gives the value range. With colour off, the shade characters
alone carry the picture.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.text import Text

from pytest_spectral.checkpoints.checkpoint import MATRICES
from pytest_spectral.printable import printable
from pytest_spectral.reporting.report import Record

SHADES = " ░▒▓█"
_COLOURS = ("blue", "cyan", "green", "yellow", "red")
_MISSING = "·"
_UNDEFINED = "x"


def render_heatmap(
    records: Sequence[Record], metric: str, *, layers: int, heads: int, width: int, color: bool
) -> str:
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
    panels = [_panel(records, metric, m, layers, heads) for m in MATRICES]
    panels = [p for p in panels if p is not None]
    panel_width = 5 + heads + 2
    per_row = max(1, console.width // panel_width)
    console.print(
        f"{printable(metric)} per head (rows: layers, columns: heads; shades are quantiles of "
        f"each panel, '{SHADES[0]}' lowest to '{SHADES[-1]}' highest, '{_UNDEFINED}' undefined)"
    )
    for start in range(0, len(panels), per_row):
        group = panels[start : start + per_row]
        for row in range(max(len(p) for p in group)):
            line = Text()
            for panel in group:
                line.append_text(panel[row] if row < len(panel) else Text(" " * (panel_width - 2)))
                line.append("  ")
            console.print(line, no_wrap=True, crop=False)
    return buffer.getvalue()


def _panel(
    records: Sequence[Record], metric: str, matrix: str, layers: int, heads: int
) -> list[Text] | None:
    grid = np.full((layers, heads), np.nan)
    present = np.zeros((layers, heads), dtype=bool)
    for record in records:
        if record["matrix"] != matrix or record["head"] is None:
            continue
        value = record["metrics"].get(metric)  # type: ignore[attr-defined]
        layer, head = int(record["layer"]), int(record["head"])  # type: ignore[arg-type]
        present[layer, head] = True
        grid[layer, head] = float(value) if value is not None else math.nan
    if not present.any():
        return None
    finite = grid[present & np.isfinite(grid)]
    edges = np.quantile(finite, np.linspace(0, 1, len(SHADES) + 1)[1:-1]) if finite.size else []
    span = f"{finite.min():.3g}..{finite.max():.3g}" if finite.size else "no values"
    lines = [Text(f"{matrix}: {span}"[: 5 + heads].ljust(5 + heads), style="bold")]
    for layer in range(layers):
        if not present[layer].any():
            continue
        line = Text(f"{layer:>3}  ")
        for head in range(heads):
            if not present[layer, head]:
                line.append(_MISSING)
            elif not math.isfinite(grid[layer, head]):
                line.append(_UNDEFINED, style="bold magenta")
            else:
                level = int(np.searchsorted(edges, grid[layer, head], side="right"))
                line.append(SHADES[level], style=_COLOURS[level])
        lines.append(line)
    return lines
