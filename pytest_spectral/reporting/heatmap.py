"""A terminal heatmap of one metric: layers down, heads across, one panel per matrix type; and,
for whole-matrix items (``--spectral-scope matrix`` or ``both``), one panel of layers down and
matrices across.

One character per head keeps a 32 x 32 panel 37 columns wide, so two panels fit side by side
in 80 columns. Every cell of a view (heads, or whole matrices) shares one centre and spread
(:mod:`pytest_spectral.reporting.scale`): a cell is shaded by how far it has gone from the
median towards the bound, on the bad side, of the rules that judge it (or 5 robust standard
deviations without one), so a collapsed head stands out, the healthy spread stays blank, and
a full shade means a broken rule. Under the panels, each matrix's true range and its worst
cell. With colour off, the shade characters alone carry the picture. A view without values
prints nothing, and a metric no item has a value of says so in one line. An encoder-decoder
model's stacks (encoder, decoder, cross) are drawn one after the other, each under its name,
so that no two of its items share a cell.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.text import Text

from pytest_spectral.checkpoints.checkpoint import HEAD_MATRICES
from pytest_spectral.checkpoints.families import WHOLE_ONLY_MATRICES
from pytest_spectral.judging.metrics import Direction
from pytest_spectral.judging.rules import Rule, rules_of_stack
from pytest_spectral.printable import printable
from pytest_spectral.reporting.report import Record
from pytest_spectral.reporting.scale import (
    Cell,
    Scale,
    cell_scales,
    is_expert_record,
    scales_legend,
)

SHADES = " ░▒▓█"
#: badness at which each shade starts (the last: at or beyond the bound)
_LEVELS = (0.25, 0.5, 0.75, 1.0)
_COLOURS = ("default", "green", "yellow", "bright_red", "bold red")
_MISSING = "·"
_UNDEFINED = "x"
_KEY = (
    "Shade: share of the way there, ' ' under 25%, '░' 25-50%, '▒' 50-75%, '▓' 75-100%, '█' at "
    f"or beyond; '{_UNDEFINED}' undefined, '{_MISSING}' not collected."
)


def render_heatmap(
    records: Sequence[Record],
    metric: str,
    *,
    layers: int,
    heads: int | Mapping[str | None, int],
    width: int,
    color: bool,
    bad: Direction | None = None,
    rules: Sequence[Rule] = (),
    log: bool = False,
) -> str:
    """The heatmaps of ``metric`` (a key of the records' ``metrics``) as text: the head view
    when there are head items, the whole-matrix view when there are whole-matrix items; for
    an encoder-decoder model, those of each stack in turn, headed by the stack's name (a
    multimodal model's text model, beside its vision stack, by ``text model``).

    ``bad`` is the metric's bad side, ``rules`` the run's rules (each cell reaches to the
    bounds of those that judge it) and ``log`` whether to measure distances in log10 (see
    :func:`~pytest_spectral.reporting.scale.cell_scales`). ``heads`` may map each stack to
    its own count (a vision tower's heads are not its text model's).
    """
    per_stack = heads if isinstance(heads, Mapping) else {}
    count = heads if isinstance(heads, int) else 0
    stacks = list(dict.fromkeys(record.get("stack") for record in records))
    if stacks in ([], [None]):
        mine_heads = per_stack.get(None, count)
        return _render(records, metric, layers, mine_heads, width, color, bad, rules, log)
    parts = []
    for stack in stacks:
        mine = [record for record in records if record.get("stack") == stack]
        judging = rules_of_stack(rules, stack)
        mine_heads = per_stack.get(stack, count)  # type: ignore[arg-type]
        text = _render(mine, metric, layers, mine_heads, width, color, bad, judging, log)
        parts.append(f"{stack} stack:\n{text}" if stack else f"text model:\n{text}")
    return "".join(parts)


def _render(
    records: Sequence[Record],
    metric: str,
    layers: int,
    heads: int,
    width: int,
    color: bool,
    bad: Direction | None,
    rules: Sequence[Rule],
    log: bool,
) -> str:
    """The heatmaps of a model of one stack, or of one stack's records."""
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
    drawn = False
    for whole in (False, True):
        cells = _cells(records, metric, whole=whole)
        values = {cell: v for cell, v in cells.items() if v is not None and math.isfinite(v)}
        if not values:
            continue
        drawn = True
        scales = cell_scales(metric, values, bad=bad, rules=rules, log=log)
        what = (
            "whole matrix (rows: layers, columns: matrices)"
            if whole
            else ("head (rows: layers, columns: heads)")
        )
        legend = scales_legend(scales, "every matrix" if whole else "every panel")
        console.print(printable(f"{metric} per {what}: {legend}. {_KEY}"))
        if whole:
            _print_rows(console, _matrix_panel(cells, scales, layers))
            if any(is_expert_record(r) for r in records):
                console.print("expert matrices (expertNN-gate, -up, -down) are not drawn")
        else:
            panels = [
                _head_panel(matrix, cells, scales, layers, heads) for matrix in _matrices(cells)
            ]
            _print_side_by_side(console, panels, 5 + heads + 2)
        for matrix in _matrices(cells):
            console.print(_range_line(matrix, cells, scales))
    if not drawn:
        console.print(printable(f"{metric}: no collected item has a value of it to draw."))
    return buffer.getvalue()


def _cells(records: Sequence[Record], metric: str, *, whole: bool) -> dict[Cell, float | None]:
    """The metric's value of every item of the view that has a result (``nan`` where the
    metric is undefined; ``None`` where the item does not record it)."""
    cells: dict[Cell, float | None] = {}
    for record in records:
        if (record["head"] is None) != whole or record.get("status") == "no_result":
            continue
        if is_expert_record(record):  # hundreds per layer: not drawn (see render)
            continue
        value = record["metrics"].get(metric)  # type: ignore[attr-defined]
        head = None if whole else int(record["head"])  # type: ignore[call-overload]
        cell = (int(record["layer"]), head, str(record["matrix"]))  # type: ignore[call-overload]
        cells[cell] = math.nan if value is None else float(value)
    return cells


def _matrices(cells: dict[Cell, float | None]) -> list[str]:
    """The view's matrices, q, k, v, o and the circuits first, then the MLP's in their usual
    order."""
    order = HEAD_MATRICES + WHOLE_ONLY_MATRICES
    present = {matrix for _, _, matrix in cells}
    return sorted(present, key=lambda m: (order.index(m) if m in order else len(order), m))


def _shade(value: float | None, scale: Scale | None) -> tuple[str, str | None]:
    """The character and style of one cell."""
    if value is None or scale is None or not math.isfinite(value):
        return _UNDEFINED, "bold magenta"
    level = int(np.searchsorted(_LEVELS, scale.badness(value), side="right"))
    return SHADES[level], _COLOURS[level]


def _head_panel(
    matrix: str,
    cells: dict[Cell, float | None],
    scales: dict[Cell, Scale],
    layers: int,
    heads: int,
) -> list[Text]:
    lines = [Text(f"{matrix}".ljust(5 + heads), style="bold")]
    for layer in range(layers):
        if not any((layer, head, matrix) in cells for head in range(heads)):
            continue
        line = Text(f"{layer:>3}  ")
        for head in range(heads):
            cell = (layer, head, matrix)
            if cell not in cells:
                line.append(_MISSING)
            else:
                line.append(*_shade(cells[cell], scales.get(cell)))
        lines.append(line)
    return lines


def _matrix_panel(
    cells: dict[Cell, float | None], scales: dict[Cell, Scale], layers: int
) -> list[Text]:
    """Layers down, one column per matrix, headed by its name."""
    matrices = _matrices(cells)
    widths = [max(2, len(m) + 1) for m in matrices]
    header = Text("     ", style="bold")
    for matrix, column in zip(matrices, widths, strict=True):
        header.append(matrix.ljust(column), style="bold")
    lines = [header]
    for layer in range(layers):
        if not any((layer, None, matrix) in cells for matrix in matrices):
            continue
        line = Text(f"{layer:>3}  ")
        for matrix, column in zip(matrices, widths, strict=True):
            cell = (layer, None, matrix)
            character, style = (
                _shade(cells[cell], scales.get(cell)) if cell in cells else (_MISSING, None)
            )
            line.append(character, style=style)
            line.append(" " * (column - 1))
        lines.append(line)
    return lines


def _print_side_by_side(console: Console, panels: list[list[Text]], panel_width: int) -> None:
    per_row = max(1, console.width // panel_width)
    for start in range(0, len(panels), per_row):
        group = panels[start : start + per_row]
        for row in range(max(len(p) for p in group)):
            line = Text()
            for panel in group:
                line.append_text(panel[row] if row < len(panel) else Text(" " * (panel_width - 2)))
                line.append("  ")
            console.print(line, no_wrap=True, crop=False)


def _print_rows(console: Console, lines: list[Text]) -> None:
    for line in lines:
        console.print(line, no_wrap=True, crop=False)


def _range_line(matrix: str, cells: dict[Cell, float | None], scales: dict[Cell, Scale]) -> str:
    """``q: 0.4224..0.9737; furthest: L1 H2 0.9737`` (the true range, and the cell that has
    gone furthest on its scale)."""
    mine = {cell: value for cell, value in cells.items() if cell[2] == matrix}
    finite = {c: v for c, v in mine.items() if v is not None and math.isfinite(v)}
    undefined = len(mine) - len(finite)
    if not finite:
        return f"{matrix}: no defined values"
    low, high = min(finite.values()), max(finite.values())
    furthest = max(finite, key=lambda c: scales[c].badness(finite[c]))
    layer, head, _ = furthest
    where = f"L{layer}" + ("" if head is None else f" H{head}")
    text = f"{matrix}: {low:.4g}..{high:.4g}; furthest: {where} {finite[furthest]:.4g}"
    return text + (f"; {undefined} undefined" if undefined else "")
