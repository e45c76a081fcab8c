"""The HTML report reads without the README: tables rather than Python dicts, every broken rule
with its value and bound, one colour scale per metric, and legends that say which side is bad.

The model has a collapsed K slice of layer 1 (query heads 2-3: a pruning candidate), a Q head
of layer 0 scaled by 3 against a baseline (a drift: a regression) and a rank-deficient O head
of layer 1 (a floor-limited condition number)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import matplotlib.pyplot  # kept loaded across other tests' in-process runs
import numpy as np
import pytest
import torch

from pytest_spectral.judging.rules import load_rules
from pytest_spectral.reporting.html_report import _heatmaps
from pytest_spectral.reporting.scale import cell_scales
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

matplotlib.use("Agg")
SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RULES = """\
[[rules]]
name = "collapsed"
metric = "stable_rank"
min = 1.5
matrices = ["k"]

[[rules]]
name = "ill-conditioned"
metric = "first_last_ratio"
max = 300
matrices = ["o"]

[[rules]]
name = "drift"
metric = "spectral_norm"
max_change = 0.5
matrices = ["q"]
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML report of the planted model against its unplanted baseline."""
    where = tmp_path_factory.mktemp("html")
    tensors = random_llama_weights(SHAPE, seed=6)
    good = write_checkpoint(where / "good", tensors, SHAPE.config())
    tensors[attention_name(1, "k")][8:16] = torch.outer(torch.ones(8), torch.linspace(-1, 1, 32))
    tensors[attention_name(0, "q")][8:16] *= 3
    rank4 = torch.randn(32, 4, generator=torch.Generator().manual_seed(3)) @ torch.randn(4, 8)
    tensors[attention_name(1, "o")][:, 0:8] = rank4
    bad = write_checkpoint(where / "bad", tensors, SHAPE.config())
    (where / "rules.toml").write_text(RULES)
    common = ["-p", "no:cacheprovider", "-p", "no:xdist", "-q", f"--rootdir={where}"]
    assert (
        pytest.main(
            [f"--spectral-model={good}", f"--spectral-report={where / 'good.json'}", *common]
        )
        == 0
    )
    pytest.main(
        [
            f"--spectral-model={bad}",
            f"--spectral-baseline={where / 'good.json'}",
            f"--spectral-thresholds={where / 'rules.toml'}",
            f"--spectral-html={where / 'report.html'}",
            f"--spectral-report={where / 'report.json'}",
            *common,
        ]
    )
    return where / "report.html"


def section(page: str, title: str) -> str:
    start = page.index(f"<h2>{title}</h2>")
    return page[start : page.index("</section>", start)]


class TestTables:
    def test_summary_and_settings_are_tables_not_dict_text(self, report) -> None:
        page = report.read_text()
        assert "{'" not in page
        assert "': " not in page
        summary = section(page, "Summary")
        assert "<tr><th>failed</th><td>4</td></tr>" in summary  # 1 drift + 2 K + 1 O
        assert "<tr><th>regressed slices</th><td>1</td></tr>" in summary
        assert "<tr><th>pruning candidate slices</th><td>2</td></tr>" in summary
        settings = section(page, "Settings")
        assert "<tr><th>layers</th><td>0-1</td></tr>" in settings
        assert "<tr><th>matrices</th><td>q, k, v, o</td></tr>" in settings

    def test_the_run_and_settings_say_whether_items_can_fail(self, report, tmp_path) -> None:
        page = report.read_text()
        assert (
            "<tr><th>mode</th><td>a broken rule with severity = &quot;fail&quot; fails its "
            "item</td></tr>" in section(page, "Run")
        )
        assert "<tr><th>warn_only</th><td>no</td></tr>" in section(page, "Settings")
        where = report.parent
        warn_only = tmp_path / "warn-only.html"
        pytest.main(
            [
                f"--spectral-model={where / 'bad'}",
                f"--spectral-baseline={where / 'good.json'}",
                f"--spectral-thresholds={where / 'rules.toml'}",
                "--spectral-warn-only",
                f"--spectral-html={warn_only}",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:xdist",
                "-q",
                f"--rootdir={where}",
            ]
        )
        page = warn_only.read_text()
        assert (
            "<tr><th>mode</th><td>warn-only: every problem reported as a warning, nothing "
            "fails</td></tr>" in section(page, "Run")
        )
        assert "<tr><th>warn_only</th><td>yes</td></tr>" in section(page, "Settings")
        assert "True" not in page.split("<img")[0]

    def test_broken_rules_show_values_and_bounds(self, report) -> None:
        page = report.read_text()
        candidates = section(page, "Low-rank pruning candidates")
        assert re.search(r"collapsed: stable_rank = [\d.]+ &lt; min 1\.5", candidates)
        assert re.search(
            r"ill-conditioned: first_last_ratio &gt;= [\d.]+ &gt; max 300 \(a lower bound",
            candidates,
        )
        regressions = section(page, "Regressions")
        drift = r"drift: spectral_norm = [\d.]+ vs baseline [\d.]+ \(\+\d+\.\d%\) &gt; max_change"
        assert re.search(drift + r" \+0\.5", regressions)
        assert "collapsed" not in regressions  # a compressible break is no regression

    def test_the_json_report_agrees(self, report) -> None:
        content = json.loads(report.with_name("report.json").read_text())
        assert [r["rules"] for r in content["regressions"]] == [["drift"]]
        assert sorted(tuple(c["heads"]) for c in content["candidates"]) == [(0,), (2, 3)]


class TestHeatmaps:
    def test_every_metric_has_a_legend_saying_which_side_is_bad(self, report) -> None:
        page = report.read_text()
        for metric, words in (
            ("top_k_ratio", "high is bad"),
            ("effective_rank", "low is bad"),
            ("stable_rank", "low is bad"),
            ("first_last_ratio", "high is bad"),
        ):
            legend = section(page, f"{metric} across layers and heads")
            assert f'<p class="legend">{metric}: {words}; ' in legend

    def test_four_panels_share_one_scale_where_a_collapse_saturates(self, tmp_path) -> None:
        rng = np.random.default_rng(0)
        cells = {
            (layer, head, matrix): float(rng.uniform(5.5, 6.5))
            for layer in range(4)
            for head in range(8)
            for matrix in "qkvo"
        }
        cells[(0, 0, "q")] = 1.2  # a collapsed q head
        path = tmp_path / "rules.toml"
        path.write_text('[[rules]]\nname = "c"\nmetric = "stable_rank"\nmin = 1.5\n')
        scales = cell_scales("stable_rank", cells, bad="low", rules=load_rules(path).rules)
        figure = _heatmaps(cells, scales, 4, 8)
        images = [axis.images[0] for axis in figure.axes if axis.images]
        assert len(images) == 4
        assert len(figure.axes) == 5  # four panels and one colour bar
        colour_bar = figure.axes[4]
        assert [t.get_text() for t in colour_bar.get_yticklabels()] == [
            "1.5",
            f"{scales[(0, 0, 'q')].centre:.4g}",
            f"{scales[(0, 0, 'q')].high.value:.4g}",
        ]
        shown = images[0].get_array()
        norm = images[0].norm
        healthy = [abs(norm(v) - 0.5) for v in np.ravel(shown)[1:]]
        assert max(healthy) < 0.15  # near white
        assert norm(shown[0, 0]) <= 0.0  # at or beyond the bound: the darkest colour

    def test_a_passing_head_is_not_coloured_by_another_matrixs_bound(self, tmp_path) -> None:
        """q and k bounded at 0.99, v and o at 0.5: a q head at 0.974 passes, short of its
        own bound; a v head at 0.52 is beyond its."""
        cells = {(0, h, m): 0.45 for h in range(8) for m in "qkvo"}
        cells[(0, 2, "q")] = 0.974
        cells[(0, 3, "v")] = 0.52
        path = tmp_path / "rules.toml"
        path.write_text(
            '[[rules]]\nname = "qk"\nmetric = "top_k_ratio"\nmax = 0.99\nmatrices = ["q", "k"]\n'
            '[[rules]]\nname = "vo"\nmetric = "top_k_ratio"\nmax = 0.5\nmatrices = ["v", "o"]\n'
        )
        scales = cell_scales("top_k_ratio", cells, bad="high", rules=load_rules(path).rules)
        figure = _heatmaps(cells, scales, 1, 8)
        q, _, v, _ = (axis.images[0].get_array() for axis in figure.axes[:4])
        assert q[0, 2] == pytest.approx((0.974 - 0.45) / (0.99 - 0.45))  # short of 1
        assert v[0, 3] > 1
        ticks = [t.get_text() for t in figure.axes[4].get_yticklabels()]
        assert ticks == ["low reach", "median", "high reach"]  # two scales: words, not values


class TestWholeMatrices:
    """A matrix-scope run gets a table and layer x matrix heatmaps of its whole matrices."""

    @pytest.fixture(scope="class")
    @classmethod
    def page(cls, tmp_path_factory: pytest.TempPathFactory) -> str:
        where = tmp_path_factory.mktemp("whole")
        shape = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=48)
        model = write_checkpoint(
            where / "model", random_llama_weights(shape, seed=1), shape.config()
        )
        common = ["-p", "no:cacheprovider", "-p", "no:xdist", "-q", f"--rootdir={where}"]
        html = where / "r.html"
        pytest.main(
            [f"--spectral-model={model}", "--spectral-scope=matrix", f"--spectral-html={html}",
             *common]
        )  # fmt: skip
        return html.read_text()

    def test_every_whole_matrix_is_tabled_with_its_metrics(self, page) -> None:
        table = section(page, "Whole matrices")
        assert table.count("<tr class=") == 14  # 2 layers x q, k, v, o, gate, up, down
        assert "<th>alpha</th>" in table
        assert "<td>1</td><td>down</td><td>32x48</td><td>passed</td>" in table

    def test_heatmaps_of_layers_by_matrices(self, page) -> None:
        for metric in ("alpha", "top_k_ratio", "stable_rank", "effective_rank"):
            heatmap = section(page, f"{metric} across layers and whole matrices")
            assert 'src="data:image/png;base64,' in heatmap
            assert "one scale for every matrix" in heatmap
        assert "across layers and heads" not in page  # no head items: no empty head maps


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """Every image decodes, the tables are there; a screenshot is kept for a person to look
    at (``pytest --basetemp=DIR``)."""
    browser = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [*browser, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    images = report.read_text().count('src="data:image/png;base64,')
    assert images == 6  # 4 heatmaps + curves of layers 0 and 1
    assert f'data-images-rendered="{images}"' in dom
    for table in ("meta", "summary", "settings", "regressions", "candidates"):
        assert f'<table class="{table}">' in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [*browser, "--hide-scrollbars", "--window-size=1400,4000", f"--screenshot={shot}",
         report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 50_000
