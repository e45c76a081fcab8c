"""A single self-contained HTML report: the seed article's views, viewable offline.

Plots are drawn with matplotlib (the optional ``plot`` extra) and embedded as base64 PNGs, so
the file needs no network, no server and no JavaScript library; one inline script only
records, for automated checks, how many images the browser decoded.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np

from pytest_spectral.checkpoints.checkpoint import CIRCUITS, HEAD_MATRICES, MATRICES
from pytest_spectral.checkpoints.families import WHOLE_ONLY_MATRICES
from pytest_spectral.judging.candidates import Candidate, Regression
from pytest_spectral.judging.metrics import METRICS
from pytest_spectral.judging.rules import Rule, rules_of_stack
from pytest_spectral.printable import printable
from pytest_spectral.reporting.broken_rules import describe_broken, status_problem
from pytest_spectral.reporting.report import Record
from pytest_spectral.reporting.scale import (
    Cell,
    Scale,
    cell_scales,
    direction_words,
    is_expert_record,
    scales_legend,
)

#: The start of every HTML report's title, by which an earlier one at the path is recognised
HTML_MARK = b"<title>pytest-spectral: "
#: Metrics drawn as layer x head heatmaps (log10 where the metric's metadata says so).
HEATMAP_METRICS: tuple[str, ...] = (
    "top_k_ratio",
    "effective_rank",
    "stable_rank",
    "first_last_ratio",
)
#: Metrics drawn as layer x matrix heatmaps of whole-matrix items, and tabled for each
WHOLE_HEATMAP_METRICS: tuple[str, ...] = ("alpha", "top_k_ratio", "stable_rank", "effective_rank")
WHOLE_TABLE_METRICS: tuple[str, ...] = (
    "alpha",
    "top_k_ratio",
    "stable_rank",
    "effective_rank",
    "first_last_ratio",
    "spectral_norm",
    "mp_spikes",
)
MAX_CURVE_LAYERS = 4
#: diverging colour maps, white at the median: red on the bad side
_COLOUR_MAPS = {"high": "RdBu_r", "low": "RdBu", "both": "RdBu_r", None: "RdBu_r"}


class PlotExtraMissingError(ImportError):
    """matplotlib is not installed; the message says how to get it."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotExtraMissingError(
            "--spectral-html needs matplotlib: pip install 'pytest-spectral[plot]'"
        ) from None


def render_html(
    report: Mapping[str, object],
    candidates: Sequence[Candidate],
    regressions: Sequence[Regression],
    *,
    energy: float,
    rules: Sequence[Rule] = (),
    history: Sequence[str] = (),
) -> str:
    """The page: run, summary and settings tables, regressions, pruning candidates, items
    without a result, one heatmap figure per metric (one centre and spread for its panels,
    each cell reaching to the bounds of the ``rules`` that judge it), a table and heatmaps of
    the whole-matrix items, the singular values of the flagged layers, and the ``history``
    sections (``history.page.history_sections``) when the run has one."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    items: list[Record] = report["items"]  # type: ignore[assignment]
    with_values = [r for r in items if r["status"] != "no_result"]
    records = [r for r in with_values if r["head"] is not None]
    wholes = [r for r in with_values if r["head"] is None]
    model: Mapping[str, object] = report["model"]  # type: ignore[assignment]
    layers, model_heads = int(model["num_hidden_layers"]), int(model["num_attention_heads"])  # type: ignore[call-overload]
    sections = [
        _section("Run", _metadata_table(report)),
        _section("Summary", _summary_table(report)),
        _section("Settings", _settings_table(report)),
        _section("Regressions", _regressions_table(regressions)),
        _section("Low-rank pruning candidates", _candidates_table(candidates, energy)),
    ]
    unfinished = [r for r in items if r["status"] == "no_result"]
    if unfinished:
        sections.append(_section("Items without a result", _unfinished_table(unfinished)))
    stacks: Mapping[str, int] = model.get("stacks") or {}  # type: ignore[assignment]
    own: Mapping[str, Mapping[str, int]] = model.get("stack_geometry") or {}  # type: ignore[assignment]
    for stack, mine in _by_stack(records):
        count = stacks.get(stack, layers) if stack else layers
        heads = int(own.get(stack or "", {}).get("num_attention_heads", model_heads))
        for metric in HEATMAP_METRICS:
            cells = _cells(mine, metric)
            if cells:
                scales = _scales(metric, cells, rules_of_stack(rules, stack))
                figure = _heatmaps(cells, scales, count, heads, _panels(mine))
                sections.append(
                    _section(
                        f"{metric} across layers and heads{_of(stack)}",
                        _img(figure, metric) + _legend(metric, scales, "every panel"),
                    )
                )
    if wholes:
        sections.append(_section("Whole matrices", _whole_table(wholes)))
    drawn = [r for r in wholes if not is_expert_record(r)]
    for stack, mine in _by_stack(drawn):
        count = stacks.get(stack, layers) if stack else layers
        for metric in WHOLE_HEATMAP_METRICS:
            cells = _cells(mine, metric)
            if cells:
                scales = _scales(metric, cells, rules_of_stack(rules, stack))
                figure = _matrix_heatmap(cells, scales, count)
                sections.append(
                    _section(
                        f"{metric} across layers and whole matrices{_of(stack)}",
                        _img(figure, f"{metric}, whole matrices")
                        + _legend(metric, scales, "every matrix")
                        + (f"<p>{_EXPERTS_NOT_DRAWN}</p>" if len(drawn) < len(wholes) else ""),
                    )
                )
    for stack, layer in _curve_layers(records, candidates, regressions):
        mine = [r for r in records if r.get("stack") == stack]
        where = _text(f"{stack} layer {layer}" if stack else f"layer {layer}")
        sections.append(
            _section(
                f"Singular values of every head, {where}",
                _img(_curves(mine, layer), f"singular values, {where}"),
            )
        )
    sections.extend(history)
    shown = model.get("argument") if model.get("source") == "hub" else model.get("path")
    title = f"pytest-spectral: {_text(shown or '')}"
    return _PAGE.format(title=title, body="\n".join(sections))


def _by_stack(records: Sequence[Record]) -> list[tuple[str | None, list[Record]]]:
    """The records of each stack of an encoder-decoder model, in order; all of them, under
    ``None``, for a model of one stack (whose figures are drawn as before)."""
    stacks = dict.fromkeys(r.get("stack") for r in records)
    return [(s, [r for r in records if r.get("stack") == s]) for s in stacks]  # type: ignore[misc]


def _of(stack: str | None) -> str:
    return "" if stack is None else _text(f", {stack} stack")


def _layer_cell(record: Record) -> str:
    """A table's layer cell: ``3``, or ``cross 3`` in an encoder-decoder model."""
    stack = record.get("stack")
    return _text(record["layer"] if stack is None else f"{stack} {record['layer']}")


#: a mixture of experts has hundreds of expert matrices per layer: a column each would make a
#: figure no one can read (and matplotlib cannot draw)
_EXPERTS_NOT_DRAWN = (
    "Expert matrices (expertNN-gate, -up, -down) are not drawn; the table above and the JSON "
    "report have each."
)


def _cells(records: Sequence[Record], metric: str) -> dict[Cell, float]:
    """The finite values of ``metric``, by cell (the head is ``None`` for a whole matrix)."""
    cells = {}
    for r in records:
        value = _value(r, metric)
        if math.isfinite(value):
            head = None if r["head"] is None else int(r["head"])  # type: ignore[call-overload]
            cells[(int(r["layer"]), head, str(r["matrix"]))] = value  # type: ignore[call-overload]
    return cells


def _scales(metric: str, cells: Mapping[Cell, float], rules: Sequence[Rule]) -> dict[Cell, Scale]:
    spec = METRICS[metric]
    return cell_scales(metric, cells, bad=spec.bad, rules=rules, log=spec.log_scale)


def _legend(metric: str, scales: Mapping[Cell, Scale], across: str) -> str:
    words = _text(scales_legend(scales, across))
    return f'<p class="legend">{_text(metric)}: {words}. {_COLOUR_WORDS}</p>'


_COLOUR_WORDS = (
    "White is the median; the colour deepens towards the reach of the scale on each side "
    "and saturates beyond it; red is the bad side (both sides are red and blue when both "
    "are suspect); grey: undefined or not collected."
)


def _curve_layers(
    records: Sequence[Record], candidates: Sequence[Candidate], regressions: Sequence[Regression]
) -> list[tuple[str | None, int]]:
    """(stack, layer) of the layers whose curves are drawn: the flagged ones, else the first."""
    order = {
        stack: index for index, stack in enumerate(dict.fromkeys(r.get("stack") for r in records))
    }

    def place(r: Record) -> tuple[int, int, str | None]:
        stack = r.get("stack")
        return order.get(stack, len(order)), int(r["layer"]), stack  # type: ignore[call-overload, return-value]

    flagged = sorted(
        {place(c.record) for c in (*candidates, *regressions) if c.record["head"] is not None}
    )
    present = sorted({place(r) for r in records})
    return [(stack, layer) for _, layer, stack in (flagged or present[:1])[:MAX_CURVE_LAYERS]]


def _heatmaps(
    cells: Mapping[Cell, float],
    scales: Mapping[Cell, Scale],
    layers: int,
    heads: int,
    matrices: Sequence[str] = MATRICES,
):
    """A panel per matrix of ``matrices`` (q, k, v, o, and qk, ov when collected), each cell
    coloured by its position on its own scale (0 at the median, +-1 at the reach of each
    side: see ``scale.cell_scales``), with one colour bar."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(
        1, len(matrices), figsize=(3.5 * len(matrices), 3.6), constrained_layout=True
    )
    for axis, matrix in zip(axes, matrices, strict=True):
        grid = np.full((layers, heads), np.nan)
        for (layer, head, m), value in cells.items():
            if m == matrix:
                grid[layer, head] = scales[(layer, head, m)].position(value)
        image = _draw(axis, grid, scales)
        axis.set_title(matrix)
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    _colour_bar(figure, image, list(axes), scales)
    return figure


def _matrix_heatmap(cells: Mapping[Cell, float], scales: Mapping[Cell, Scale], layers: int):
    """Whole matrices: layers down, one column per matrix, coloured as :func:`_heatmaps`."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    order = HEAD_MATRICES + WHOLE_ONLY_MATRICES
    matrices = sorted(
        {m for _, _, m in cells},
        key=lambda m: (m not in order, order.index(m) if m in order else 0, m),
    )
    grid = np.full((layers, len(matrices)), np.nan)
    for (layer, head, matrix), value in cells.items():
        grid[layer, matrices.index(matrix)] = scales[(layer, head, matrix)].position(value)
    figure, axis = plt.subplots(figsize=(2 + 0.8 * len(matrices), 3.6), constrained_layout=True)
    image = _draw(axis, grid, scales)
    axis.set_xticks(range(len(matrices)), matrices)
    axis.set_ylabel("layer")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    _colour_bar(figure, image, [axis], scales)
    return figure


def _draw(axis, grid: np.ndarray, scales: Mapping[Cell, Scale]):  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    bad = next(iter(scales.values())).bad
    cmap = plt.get_cmap(_COLOUR_MAPS[bad]).with_extremes(bad="#bbbbbb")
    return axis.imshow(
        grid, aspect="auto", cmap=cmap, norm=Normalize(-1, 1), interpolation="nearest"
    )


def _colour_bar(figure, image, axes: list, scales: Mapping[Cell, Scale]) -> None:  # type: ignore[no-untyped-def]
    """Ticks at both reaches and the median: the values when every cell has one scale,
    else words (the legend under the figure gives each scale's reach)."""
    distinct = list(dict.fromkeys(scales.values()))
    bar = figure.colorbar(image, ax=axes, shrink=0.85, extend="both", ticks=[-1, 0, 1])
    first = distinct[0]
    if len(distinct) == 1:
        labels = [f"{v:.4g}" for v in (first.low.value, first.centre, first.high.value)]
    else:
        labels = ["low reach", "median", "high reach"]
    bar.ax.set_yticklabels(labels)
    log = "log10 " if first.log else ""
    bar.set_label(f"{log}{first.metric} ({direction_words(first.bad)})")


def _panels(records: Sequence[Record]) -> tuple[str, ...]:
    """q, k, v and o always (an empty panel says they were not collected); the circuits when
    a run collected them."""
    present = {r["matrix"] for r in records}
    return MATRICES + tuple(c for c in CIRCUITS if c in present)


def _value(record: Record, metric: str) -> float:
    return float(record["metrics"].get(metric, math.nan))  # type: ignore[attr-defined, arg-type]


def _curves(records: Sequence[Record], layer: int):
    import matplotlib.pyplot as plt

    matrices = _panels(records)
    figure, axes = plt.subplots(
        1, len(matrices), figsize=(3.5 * len(matrices), 3.6), constrained_layout=True
    )
    for axis, matrix in zip(axes, matrices, strict=True):
        for r in records:
            if r["layer"] != layer or r["matrix"] != matrix:
                continue
            values = np.array([float(v) for v in r["singular_values"]])  # type: ignore[attr-defined]
            flagged = r["outcome"] != "passed"
            axis.plot(
                values,
                color="crimson" if flagged else "steelblue",
                alpha=0.9 if flagged else 0.35,
                linewidth=1.4 if flagged else 0.8,
                label=f"head {r['head']}" if flagged else None,
            )
        axis.set_yscale("log")
        axis.set_title(f"{matrix}, layer {layer}")
        axis.set_xlabel("index")
        axis.set_ylabel("singular value")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    return figure


def _img(figure, alt: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{data}">'


def _section(title: str, content: str) -> str:
    return f"<section><h2>{_text(title)}</h2>\n{content}\n</section>"


def _metadata_table(report: Mapping[str, object]) -> str:
    model: Mapping[str, object] = report["model"]  # type: ignore[assignment]
    rules: Mapping[str, object] = report["rules"]  # type: ignore[assignment]
    baseline: Mapping[str, object] | None = report.get("baseline")  # type: ignore[assignment]
    settings: Mapping[str, object] = report["settings"]  # type: ignore[assignment]
    count = int(rules.get("count") or 0)  # type: ignore[call-overload]
    rows = [
        ("model", model.get("argument")),
        ("path", model.get("path")),
        ("model type", model.get("model_type")),
        (
            "layers / heads / K/V heads / head_dim / hidden",
            " / ".join(
                str(model.get(k))
                for k in (
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "hidden_size",
                )
            ),
        ),
        ("dtype", model.get("dtype")),
        (
            "rules",
            f"{rules.get('path')} ({count} rule{'' if count == 1 else 's'}, sha256 "
            f"{str(rules.get('sha256'))[:12]})"
            if rules.get("path")
            else "no rules file",
        ),
        (
            "baseline",
            f"{baseline.get('path')} (sha256 {str(baseline.get('sha256'))[:12]})"
            if baseline
            else "none",
        ),
        (
            "mode",
            "warn-only: every problem reported as a warning, nothing fails"
            if settings.get("warn_only")
            else 'a broken rule with severity = "fail" fails its item',
        ),
        ("plugin", f"pytest-spectral {report.get('plugin_version')}, {report.get('created')}"),
    ]
    return _key_value_table(rows, "meta")


def _summary_table(report: Mapping[str, object]) -> str:
    """Items by outcome, then what the failed and warned slices call for."""
    summary: Mapping[str, object] = report["summary"]  # type: ignore[assignment]
    words = {
        "items": "items",
        "passed": "passed",
        "failed": "failed",
        "warned": "warned",
        "error": "error (crashed or raised)",
        "skipped": "skipped",
        "not_run": "not run",
        "regressions": "regressed slices",
        "candidates": "pruning candidate slices",
        "params_saved": "parameters saved by acting on every candidate",
    }
    rows = [
        (words.get(key, key), f"{value:,}" if isinstance(value, int) else value)
        for key, value in summary.items()
    ]
    return _key_value_table(rows, "summary")


def _settings_table(report: Mapping[str, object]) -> str:
    settings: Mapping[str, object] = report["settings"]  # type: ignore[assignment]
    rows = [(key, _setting(value)) for key, value in settings.items()]
    return _key_value_table(rows, "settings")


def _setting(value: object) -> str:
    """A list reads as its items (layers as ranges: 0-31), a flag as yes or no (not
    Python's True and False), anything else as itself."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return _ranges(value)  # type: ignore[arg-type]
        return ", ".join(map(str, value))
    return str(value)


def _ranges(numbers: list[int]) -> str:
    """0-3, 8 for [0, 1, 2, 3, 8]."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _key_value_table(rows: Sequence[tuple[str, object]], css: str) -> str:
    body = "".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in rows)
    return f'<table class="{css}">{body}</table>'


def _broken_rules(entries: Sequence[Record], record: Record) -> str:
    """One line per broken rule: its value and the bound it broke (``>=`` when the value is
    a floor-limited lower bound)."""
    limited = bool(record.get("floor_limited"))
    return "<br>".join(
        _text(
            describe_broken(b, floor_limited=limited)
            + (" (warn)" if b["severity"] == "warn" else "")
        )
        for b in entries
    )


def _regressions_table(regressions: Sequence[Regression]) -> str:
    if not regressions:
        return "<p>No regressions: nothing non-finite, zero, drifted or beyond a harmful bound.</p>"
    header = (
        "<tr><th>layer</th><th>head</th><th>matrix</th><th>outcome</th>"
        "<th>problem (value and bound)</th><th>shape</th></tr>"
    )
    rows = []
    for g in regressions:
        r = g.record
        status = status_problem(r)
        problems = [_text(status)] if status else []
        if g.rules:
            problems.append(_broken_rules(g.rules, r))
        rows.append(
            f'<tr class="{_text(r["outcome"])}"><td>{_layer_cell(r)}</td><td>{_heads(g)}</td>'
            f"<td>{_text(r['matrix'])}</td><td>{_text(r['outcome'])}</td>"
            f"<td>{'<br>'.join(problems)}</td>"
            f"<td>{'x'.join(map(str, r['shape']))}</td></tr>"  # type: ignore[call-overload]
        )
    note = "<p>Damage rather than compressibility: these slices are not pruning candidates.</p>"
    return f'<table class="regressions">{header}{"".join(rows)}</table>{note}'


def _candidates_table(candidates: Sequence[Candidate], energy: float) -> str:
    if not candidates:
        return "<p>No pruning candidates: no broken rule suggests pruning.</p>"
    header = (
        "<tr><th>layer</th><th>head</th><th>matrix</th><th>outcome</th>"
        "<th>rules broken (value and bound)</th>"
        f"<th>rank@{energy:.0%}</th><th>shape</th><th>params saved</th></tr>"
    )
    rows = []
    for c in candidates:
        r = c.record
        rows.append(
            f'<tr class="{_text(r["outcome"])}"><td>{_layer_cell(r)}</td><td>{_heads(c)}</td>'
            f"<td>{_text(r['matrix'])}</td><td>{_text(r['outcome'])}</td>"
            f"<td>{_broken_rules(c.rules, r)}</td>"
            f"<td>{'-' if c.rank is None else c.rank}</td>"
            f"<td>{'x'.join(map(str, r['shape']))}</td>"  # type: ignore[call-overload]
            f"<td>{c.saved:,} ({c.saving_fraction:.0%}){_text(' ' + c.needs if c.needs else '')}"
            "</td></tr>"
        )
    note = (
        f"<p>rank@{energy:.0%} keeps {energy:.0%} of the slice's energy. These are candidates "
        "for data-aware compression (ASVD, SVD-LLM), not safe truncations.</p>"
    )
    return f'<table class="candidates">{header}{"".join(rows)}</table>{note}'


def _whole_table(records: Sequence[Record]) -> str:
    """Every whole-matrix item with a result: where, outcome and its main metrics."""
    order = MATRICES + WHOLE_ONLY_MATRICES

    stacks = list(dict.fromkeys(r.get("stack") for r in records))

    def key(r: Record) -> tuple[int, int, int, str]:
        matrix = str(r["matrix"])
        rank = order.index(matrix) if matrix in order else len(order)
        return (stacks.index(r.get("stack")), int(r["layer"]), rank, matrix)  # type: ignore[call-overload]

    header = (
        "<tr><th>layer</th><th>matrix</th><th>shape</th><th>outcome</th>"
        + "".join(f"<th>{_text(m)}</th>" for m in WHOLE_TABLE_METRICS)
        + "</tr>"
    )
    rows = "".join(
        f'<tr class="{_text(r["outcome"])}"><td>{_layer_cell(r)}</td><td>{_text(r["matrix"])}</td>'
        f"<td>{'x'.join(map(str, r['shape']))}</td><td>{_text(r['outcome'])}</td>"  # type: ignore[call-overload]
        + "".join(f"<td>{_value(r, m):.4g}</td>" for m in WHOLE_TABLE_METRICS)
        + "</tr>"
        for r in sorted(records, key=key)
    )
    return f'<table class="whole">{header}{rows}</table>'


def _unfinished_table(items: Sequence[Record]) -> str:
    """Items that crashed, raised, were skipped or never ran, with pytest's message."""
    rows = "".join(
        f"<tr><td>{_text(r['nodeid'])}</td><td>{_text(r['outcome'])}</td>"
        f"<td>{_text(r['error'] or '')}</td></tr>"
        for r in items
    )
    header = "<tr><th>item</th><th>outcome</th><th>why</th></tr>"
    return f'<table class="unfinished">{header}{rows}</table>'


def _text(value: object) -> str:
    """Text from a report, safe in HTML: control characters escaped, then HTML-escaped."""
    return html.escape(printable(value))


def _heads(flagged: Candidate | Regression) -> str:
    """The query heads sharing the slice ("4, 5, 6, 7" for a K/V group); "-" for a matrix."""
    return ", ".join(map(str, flagged.heads)) or "-"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
tr.failed td {{ background: #fde8e8; }} tr.warned td {{ background: #fff6dd; }}
img {{ max-width: 100%; }}
p.legend {{ max-width: 60em; color: #444; }}
</style></head>
<body data-images-rendered="0">
<h1>{title}</h1>
{body}
<script>
window.addEventListener("load", function () {{
  var ok = Array.prototype.filter.call(document.images, function (i) {{
    return i.complete && i.naturalWidth > 0; }});
  document.body.setAttribute("data-images-rendered", String(ok.length));
}});
</script>
</body></html>
"""
