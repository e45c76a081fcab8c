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

from pytest_spectral.checkpoints.checkpoint import MATRICES
from pytest_spectral.judging.candidates import Candidate
from pytest_spectral.printable import printable
from pytest_spectral.reporting.report import Record

#: Metrics drawn as layer x head heatmaps, with whether to show them on a log scale.
HEATMAP_METRICS: tuple[tuple[str, bool], ...] = (
    ("top_k_ratio", False),
    ("effective_rank", False),
    ("stable_rank", False),
    ("first_last_ratio", True),
)
MAX_CURVE_LAYERS = 4


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
    report: Mapping[str, object], candidates: Sequence[Candidate], *, energy: float
) -> str:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    items: list[Record] = report["items"]  # type: ignore[assignment]
    records = [r for r in items if r["head"] is not None and r["status"] != "no_result"]
    model: Mapping[str, object] = report["model"]  # type: ignore[assignment]
    layers, heads = int(model["num_hidden_layers"]), int(model["num_attention_heads"])  # type: ignore[call-overload]
    sections = [
        _section("Run", _metadata_table(report)),
        _section("Low-rank pruning candidates", _candidates_table(candidates, energy)),
    ]
    unfinished = [r for r in items if r["status"] == "no_result"]
    if unfinished:
        sections.append(_section("Items without a result", _unfinished_table(unfinished)))
    for metric, log in HEATMAP_METRICS:
        if any(metric in r["metrics"] for r in records):  # type: ignore[operator]
            figure = _heatmaps(records, metric, log, layers, heads)
            sections.append(_section(f"{metric} across layers and heads", _img(figure, metric)))
    for layer in _curve_layers(records, candidates):
        sections.append(
            _section(
                f"Singular values of every head, layer {layer}",
                _img(_curves(records, layer), f"singular values, layer {layer}"),
            )
        )
    title = f"pytest-spectral: {_text(model.get('argument', ''))}"
    return _PAGE.format(title=title, body="\n".join(sections))


def _curve_layers(records: Sequence[Record], candidates: Sequence[Candidate]) -> list[int]:
    flagged = sorted({int(c.record["layer"]) for c in candidates if c.record["head"] is not None})  # type: ignore[call-overload]
    present = sorted({int(r["layer"]) for r in records})  # type: ignore[call-overload]
    return (flagged or present[:1])[:MAX_CURVE_LAYERS]


def _heatmaps(records: Sequence[Record], metric: str, log: bool, layers: int, heads: int):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 4, figsize=(14, 3.6), constrained_layout=True)
    for axis, matrix in zip(axes, MATRICES, strict=True):
        grid = np.full((layers, heads), np.nan)
        for r in records:
            if r["matrix"] == matrix:
                value = float(r["metrics"].get(metric, math.nan))  # type: ignore[attr-defined]
                grid[int(r["layer"]), int(r["head"])] = value  # type: ignore[call-overload]
        shown = np.log10(grid) if log else grid
        image = axis.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
        axis.set_title(f"{matrix}" + (" (log10)" if log else ""))
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axis, shrink=0.8)
    return figure


def _curves(records: Sequence[Record], layer: int):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(14, 3.6), constrained_layout=True)
    for axis, matrix in zip(axes, MATRICES, strict=True):
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
    rows = [
        ("model", model.get("argument")),
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
        ("rules", f"{rules.get('path')} (sha256 {str(rules.get('sha256'))[:12]})"),
        ("summary", report.get("summary")),
        ("settings", report.get("settings")),
        ("plugin", f"pytest-spectral {report.get('plugin_version')}, {report.get('created')}"),
    ]
    body = "".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in rows)
    return f'<table class="meta">{body}</table>'


def _candidates_table(candidates: Sequence[Candidate], energy: float) -> str:
    if not candidates:
        return "<p>No head broke a rule.</p>"
    header = (
        "<tr><th>layer</th><th>head</th><th>matrix</th><th>outcome</th><th>rules broken</th>"
        f"<th>rank@{energy:.0%}</th><th>shape</th><th>params saved</th></tr>"
    )
    rows = []
    for c in candidates:
        r = c.record
        broken = "<br>".join(
            _text(f"{b['rule']}: {b['metric']} = {_number(b['value'])}")
            for b in r["broken_rules"]  # type: ignore[attr-defined]
        ) or _text(r["status"])
        rows.append(
            f'<tr class="{r["outcome"]}"><td>{r["layer"]}</td><td>{_heads(c)}</td>'
            f"<td>{r['matrix']}</td><td>{r['outcome']}</td><td>{broken}</td>"
            f"<td>{'-' if c.rank is None else c.rank}</td>"
            f"<td>{'x'.join(map(str, r['shape']))}</td>"  # type: ignore[call-overload]
            f"<td>{c.saved:,} ({c.saving_fraction:.0%})</td></tr>"
        )
    note = (
        f"<p>rank@{energy:.0%} keeps {energy:.0%} of the slice's energy. These are candidates "
        "for data-aware compression (ASVD, SVD-LLM), not safe truncations.</p>"
    )
    return f'<table class="candidates">{header}{"".join(rows)}</table>{note}'


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


def _heads(candidate: Candidate) -> str:
    """The query heads sharing the slice ("4, 5, 6, 7" for a K/V group); "-" for a matrix."""
    return ", ".join(map(str, candidate.heads)) or "-"


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
tr.failed td {{ background: #fde8e8; }} tr.warned td {{ background: #fff6dd; }}
img {{ max-width: 100%; }}
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
