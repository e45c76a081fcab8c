"""Gating checkpoints in CI: baselines, calibration, warn-only runs and readable reports."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_spectral.reporting.heatmap import render_heatmap
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, mlp=False)
DRIFT_RULES = """
[[rules]]
name = "drift"
metric = "spectral_norm"
max_change = 0.5
min_change = -0.5
"""


def write_model(pytester: pytest.Pytester, name: str, edit=None) -> Path:
    tensors = random_llama_weights(SHAPE, seed=11)
    if edit is not None:
        edit(tensors)
    return write_checkpoint(pytester.path / name, tensors, SHAPE.config())


def scale_q_head_1_of_layer_0(tensors: dict[str, torch.Tensor]) -> None:
    tensors[attention_name(0, "q")][8:16] *= 3


def collapse_k_head_1_of_layer_1(tensors: dict[str, torch.Tensor]) -> None:
    tensors[attention_name(1, "k")][8:16] = torch.outer(torch.ones(8), torch.linspace(-1, 1, 32))


def rules_file(pytester: pytest.Pytester, text: str) -> str:
    path = pytester.path / "rules.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def report_of(pytester: pytest.Pytester, model: Path, name: str, *extra: str) -> Path:
    pytester.runpytest(f"--spectral-model={model}", f"--spectral-report={name}", *extra)
    return pytester.path / name


class TestBaseline:
    def test_scaled_head_fails_exactly_there(self, pytester) -> None:
        original = write_model(pytester, "original")
        baseline = report_of(pytester, original, "baseline.json")
        perturbed = write_model(pytester, "perturbed", scale_q_head_1_of_layer_0)
        result = pytester.runpytest(
            f"--spectral-model={perturbed}",
            f"--spectral-baseline={baseline}",
            f"--spectral-thresholds={rules_file(pytester, DRIFT_RULES)}",
        )
        result.assert_outcomes(passed=31, failed=1)
        result.stdout.fnmatch_lines(
            [
                "  FAIL drift: spectral_norm = * vs baseline * (+200.0%) > max_change +0.5",
                "FAILED spectral::layer00::head01-q - drift: spectral_norm*",
            ]
        )

    def test_unchanged_checkpoint_passes_against_its_own_report(self, pytester) -> None:
        model = write_model(pytester, "model")
        baseline = report_of(pytester, model, "baseline.json")
        result = pytester.runpytest(
            f"--spectral-model={model}",
            f"--spectral-baseline={baseline}",
            f"--spectral-thresholds={rules_file(pytester, DRIFT_RULES)}",
        )
        result.assert_outcomes(passed=32)

    def test_items_missing_from_the_baseline_are_reported(self, pytester) -> None:
        model = write_model(pytester, "model")
        baseline = report_of(pytester, model, "partial.json", "--spectral-layers", "0")
        result = pytester.runpytest(
            f"--spectral-model={model}",
            f"--spectral-baseline={baseline}",
            f"--spectral-thresholds={rules_file(pytester, DRIFT_RULES)}",
        )
        result.assert_outcomes(passed=16, failed=16)
        result.stdout.fnmatch_lines(
            [
                "  FAIL drift: spectral_norm = * has no baseline value: the baseline report has no "
                "spectral_norm for this item, nor singular values to compute it from (an item it "
                "did not collect, or one without a result there); record the baseline again "
                "(--spectral-report) from the known-good checkpoint with the same options"
            ]
        )

    def test_a_metric_the_baseline_lacks_comes_from_its_singular_values(self, pytester) -> None:
        """A baseline recorded without rules has top_k_ratio with k = 10 only; a drift rule on
        k = 5 compares with the value computed from the singular values the report stores."""
        model = write_model(pytester, "model")
        baseline = report_of(pytester, model, "good.json")
        stored = json.loads(baseline.read_text())
        assert "top_k_ratio(k=5)" not in stored["items"][0]["metrics"]
        rules = rules_file(
            pytester,
            '[[rules]]\nname = "drift5"\nmetric = "top_k_ratio"\nk = 5\nmax_change = 0.05\n',
        )
        same = pytester.runpytest(
            f"--spectral-model={model}",
            f"--spectral-baseline={baseline}",
            f"--spectral-thresholds={rules}",
        )
        same.assert_outcomes(passed=32)
        same.stdout.fnmatch_lines(
            [
                f"spectral: --spectral-baseline {baseline} has no top_k_ratio(k=5): computed from "
                "the singular values it stores"
            ]
        )
        collapsed = write_model(pytester, "collapsed", collapse_k_head_1_of_layer_1)
        result = pytester.runpytest(
            f"--spectral-model={collapsed}",
            f"--spectral-baseline={baseline}",
            f"--spectral-thresholds={rules}",
            "--spectral-report=r.json",
        )
        result.assert_outcomes(passed=30, failed=2)
        items = {
            i["nodeid"]: i for i in json.loads((pytester.path / "r.json").read_text())["items"]
        }
        good = {i["nodeid"]: i for i in stored["items"]}
        for nodeid in ("spectral::layer01::head02-k", "spectral::layer01::head03-k"):
            (broken,) = items[nodeid]["broken_rules"]
            sigma = np.sort(np.array(good[nodeid]["singular_values"]))[::-1]
            assert broken["baseline"] == pytest.approx(sigma[:5].sum() / sigma.sum(), rel=1e-12)
            assert broken["value"] == pytest.approx(1.0, rel=1e-6)  # rank 1 now

    def test_baseline_of_another_layout_is_a_usage_error(self, pytester) -> None:
        model = write_model(pytester, "model")
        other = LlamaShape(layers=2, heads=4, kv_heads=4, head_dim=8, hidden=32, mlp=False)
        different = write_checkpoint(
            pytester.path / "other", random_llama_weights(other), other.config()
        )
        baseline = report_of(pytester, different, "other.json")
        result = pytester.runpytest(f"--spectral-model={model}", f"--spectral-baseline={baseline}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                "ERROR: *other.json: baseline is for a different model layout: "
                "model.num_key_value_heads is 4 there and 2 here"
            ]
        )

    def test_relative_rule_without_baseline_is_a_usage_error(self, pytester) -> None:
        model = write_model(pytester, "model")
        result = pytester.runpytest(
            f"--spectral-model={model}",
            f"--spectral-thresholds={rules_file(pytester, DRIFT_RULES)}",
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*rule 'drift' bounds the change against a baseline; give*"])

    def test_not_a_report(self, pytester) -> None:
        model = write_model(pytester, "model")
        (pytester.path / "x.json").write_text("[]")
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-baseline=x.json")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*x.json: not a pytest-spectral report*"])


class TestCalibration:
    def test_round_trip_passes_and_a_planted_collapse_fails_there(self, pytester) -> None:
        healthy = write_model(pytester, "healthy")
        pytester.runpytest(
            f"--spectral-model={healthy}", "--spectral-calibrate=calibrated.toml"
        ).assert_outcomes(passed=32)
        rules = (pytester.path / "calibrated.toml").read_text()
        assert "# q heads (n=8): observed" in rules
        assert 'name = "calibrated-k-effective_rank"' in rules
        args = ("--spectral-thresholds=calibrated.toml",)
        pytester.runpytest(f"--spectral-model={healthy}", *args).assert_outcomes(passed=32)
        collapsed = write_model(pytester, "collapsed", collapse_k_head_1_of_layer_1)
        result = pytester.runpytest(f"--spectral-model={collapsed}", *args)
        # K/V head 1 is shared by query heads 2 and 3: both of their k items fail.
        result.assert_outcomes(passed=30, failed=2)
        result.stdout.fnmatch_lines(
            [
                "FAILED spectral::layer01::head02-k - calibrated-k-*",
                "FAILED spectral::layer01::head03-k - calibrated-k-*",
            ]
        )

    def test_margin_widens_the_bounds(self, pytester) -> None:
        model = write_model(pytester, "model")
        for margin in ("0", "1"):
            pytester.runpytest(
                f"--spectral-model={model}",
                f"--spectral-calibrate=m{margin}.toml",
                "--spectral-calibrate-margin",
                margin,
            )
        tight, wide = (self.bounds(pytester.path / f"m{m}.toml") for m in ("0", "1"))
        name = "calibrated-q-effective_rank"
        assert wide[name][0] < tight[name][0] <= tight[name][1] < wide[name][1]

    @staticmethod
    def bounds(path: Path) -> dict[str, tuple[float, float]]:
        import tomllib

        rules = tomllib.loads(path.read_text())["rules"]
        return {r["name"]: (r["min"], r["max"]) for r in rules}


COLLAPSED = '[[rules]]\nname = "collapsed"\nmetric = "stable_rank"\nmin = 1.5\n'


class TestWarnOnly:
    def test_nothing_fails_and_candidates_are_listed(self, pytester) -> None:
        model = write_model(pytester, "model", collapse_k_head_1_of_layer_1)
        result = pytester.runpytest(
            f"--spectral-model={model}",
            "--spectral-warn-only",
            f"--spectral-thresholds={rules_file(pytester, COLLAPSED)}",
        )
        assert result.ret == pytest.ExitCode.OK
        result.assert_outcomes(passed=30, warnings=2)
        assert result.parseoutcomes()["warned"] == 2
        result.stdout.fnmatch_lines(["*Low-rank pruning candidates*", "*L1 H2-3 k*collapsed*"])

    def test_the_header_says_so(self, pytester) -> None:
        model = write_model(pytester, "model")
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-warn-only", "--co")
        result.stdout.fnmatch_lines(
            [
                "spectral: --spectral-warn-only: every broken rule, non-finite or all-zero slice "
                "is reported as a warning; no item fails (exit code 0)"
            ]
        )
        plain = pytester.runpytest(f"--spectral-model={model}", "--co")
        assert "--spectral-warn-only" not in plain.stdout.str()


class TestReportsSayWhatRan:
    """The JSON and HTML reports record the baseline compared with and warn-only mode, and
    the model's resolved path (the argument may be relative to where pytest ran)."""

    @pytest.fixture
    def reports(self, pytester) -> tuple[dict, str, Path, Path]:
        # Imported before the in-process run, which drops the modules it imported afterwards
        # (a half-dropped matplotlib fails a later plot of the same worker).
        pytest.importorskip("matplotlib.pyplot")
        model = write_model(pytester, "model")
        baseline = report_of(pytester, model, "good.json")
        (pytester.path / "elsewhere").mkdir()
        rules = rules_file(pytester, DRIFT_RULES)
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(pytester.path / "elsewhere")
            pytester.runpytest(
                "--spectral-model=../model",
                "--spectral-baseline=../good.json",
                f"--spectral-thresholds={rules}",
                "--spectral-warn-only",
                "--spectral-report=r.json",
                "--spectral-html=r.html",
            )
        out = pytester.path / "elsewhere"
        report = json.loads((out / "r.json").read_text())
        return report, (out / "r.html").read_text(), baseline, model

    def test_json(self, reports) -> None:
        report, _, baseline, model = reports
        assert report["baseline"] == {
            "path": str(baseline),
            "sha256": hashlib.sha256(baseline.read_bytes()).hexdigest(),
            "computed": [],
        }
        assert report["settings"]["warn_only"] is True
        assert report["model"]["argument"] == "../model"
        assert report["model"]["path"] == str(model.resolve())
        assert report["model"]["source"] == "local"

    def test_html(self, reports) -> None:
        _, page, baseline, model = reports
        digest = hashlib.sha256(baseline.read_bytes()).hexdigest()[:12]
        assert f"<title>pytest-spectral: {model.resolve()}</title>" in page
        assert f"<tr><th>path</th><td>{model.resolve()}</td></tr>" in page
        assert f"<tr><th>baseline</th><td>{baseline} (sha256 {digest})</td></tr>" in page
        assert "<tr><th>mode</th><td>warn-only: every problem reported as a warning" in page
        assert "(1 rule, sha256" in page  # not "1 rules"
        assert "<tr><th>warn_only</th><td>yes</td></tr>" in page

    def test_without_a_baseline(self, pytester) -> None:
        model = write_model(pytester, "model")
        report = json.loads(report_of(pytester, model, "r.json").read_text())
        assert report["baseline"] is None
        assert report["settings"]["warn_only"] is False


#: Each matrix's values apart from 10, at its own (layer, head): 3 layers x 5 heads per panel.
HEATMAP_DEVIATIONS = {
    "q": {(0, 1): 18.0, (2, 3): 14.0},
    "k": {(1, 0): 2.0, (2, 4): 12.0},
    "v": {(0, 4): 16.0, (1, 2): 8.0},
    "o": {(2, 0): 4.0, (1, 2): math.nan},
}


def heatmap_records() -> list[dict]:
    """3 layers x 5 heads, every value 10 but the few of ``HEATMAP_DEVIATIONS``, which differ
    per matrix; o has no item at layer 2 head 4."""
    return [
        {
            "layer": layer,
            "head": head,
            "matrix": matrix,
            "metrics": {"effective_rank": HEATMAP_DEVIATIONS[matrix].get((layer, head), 10.0)},
        }
        for layer in range(3)
        for head in range(5)
        for matrix in "qkvo"
        if (matrix, layer, head) != ("o", 2, 4)
    ]


def panel_lines(text: str) -> list[str]:
    """The heatmap's lines from the first panel's header on (the legend above wraps)."""
    lines = [line.rstrip() for line in text.splitlines()]
    return lines[next(i for i, line in enumerate(lines) if line.startswith("q  ")) :]


class TestHeatmap:
    # One scale for all panels (README, heatmaps): 50 of the 58 finite values are 10, so the
    # median is 10 and the median absolute deviation 0; the scale then reaches as far as the
    # furthest value, 8 away (2 and 18). A cell's shade is |value - 10| / 8 with no bad side:
    # 2 away (12, 8) is 0.25, '░'; 4 away (14) 0.5, '▒'; 6 away (16, 4) 0.75, '▓'; 8 away
    # (18, 2) 1, '█'. Each panel is 5 + 5 heads wide, with 2 columns between panels.
    PANELS = (
        "q           k           v           o",
        "  0   █       0           0      ▓    0",
        "  1           1  █        1    ░      1    x",
        "  2     ▒     2      ░    2           2  ▓   ·",
    )
    RANGES = (
        "q: 10..18; furthest: L0 H1 18",
        "k: 2..12; furthest: L1 H0 2",
        "v: 8..16; furthest: L0 H4 16",
        "o: 4..10; furthest: L2 H0 4; 1 undefined",
    )

    def test_each_panel_shades_its_own_matrix_by_hand(self) -> None:
        text = render_heatmap(
            heatmap_records(), "effective_rank", layers=3, heads=5, width=80, color=False
        )
        assert " ".join(text.split()).startswith(
            "effective_rank per head (rows: layers, columns: heads): neither direction is bad "
            "by itself; one scale for every panel, from the median 10 to 2 (5 robust SD) and "
            "18 (5 robust SD)."
        )
        assert panel_lines(text) == [*self.PANELS, *self.RANGES]

    def test_only_the_bad_side_is_shaded(self) -> None:
        """With high bad, the values below 10 (k's 2, v's 8, o's 4) stay blank."""
        text = render_heatmap(
            heatmap_records(), "effective_rank", layers=3, heads=5, width=80, color=False,
            bad="high",
        )  # fmt: skip
        assert panel_lines(text)[1:4] == [
            "  0   █       0           0      ▓    0",
            "  1           1           1           1    x",
            "  2     ▒     2      ░    2           2      ·",
        ]
        # the furthest head is the furthest on the bad side
        assert "k: 2..12; furthest: L2 H4 12" in panel_lines(text)

    def test_panels_wrap_to_the_width(self) -> None:
        # each panel is 5 + 5 heads wide plus 2 of gap: three fit in 40 columns
        text = render_heatmap(
            heatmap_records(), "effective_rank", layers=3, heads=5, width=40, color=False
        )
        assert panel_lines(text) == [
            *(line[:34].rstrip() for line in self.PANELS),
            *(line[36:] for line in self.PANELS),
            *self.RANGES,
        ]

    def test_terminal_heatmap_of_a_32_by_32_model_fits_80_columns(self) -> None:
        """q and v run 0..1023 (layer * 32 + head), k and o the same negated. The median of
        all is 0 and the median absolute deviation 511.5, so the scale reaches 5 x 1.4826 x
        511.5 = 3791.7 on each side: only values at least 948 away (25%) are shaded, from
        layer 29 head 20 on (29 * 32 + 20 = 948)."""
        records = [
            {
                "layer": layer,
                "head": head,
                "matrix": matrix,
                "metrics": {"effective_rank": float(sign * (layer * 32 + head))},
            }
            for layer in range(32)
            for head in range(32)
            for matrix, sign in zip("qkvo", (1, -1, 1, -1), strict=True)
        ]
        text = render_heatmap(records, "effective_rank", layers=32, heads=32, width=80, color=False)
        lines = [line.rstrip() for line in text.splitlines()]
        assert max(len(line) for line in lines) <= 80
        assert [line for line in lines if line.startswith((" 28  ", " 29  "))] == [
            " 28  " + " " * 32 + "   28",  # two panels a row: q k, then v o
            " 29  " + " " * 20 + "░" * 12 + "   29  " + " " * 20 + "░" * 12,
            " 28  " + " " * 32 + "   28",
            " 29  " + " " * 20 + "░" * 12 + "   29  " + " " * 20 + "░" * 12,
        ]
        assert lines[-4:] == [
            "q: 0..1023; furthest: L31 H31 1023",
            "k: -1023..0; furthest: L31 H31 -1023",
            "v: 0..1023; furthest: L31 H31 1023",
            "o: -1023..0; furthest: L31 H31 -1023",
        ]

    def test_heatmap_in_the_summary(self, pytester) -> None:
        """K/V head 1 of layer 1 (query heads 2 and 3) collapsed to rank 1: effective rank 1,
        far below the healthy heads' (low is bad for it), so only the k panel shows it, at
        full shade in both of its query heads' cells."""
        model = write_model(pytester, "model", collapse_k_head_1_of_layer_1)
        result = pytester.runpytest(
            f"--spectral-model={model}", "--spectral-heatmap", "effective_rank"
        )
        result.stdout.fnmatch_lines(
            ["effective_rank per head (rows: layers, *low is bad*", "q *k *v *o *"]
        )
        # panels are 5 + 4 heads wide with 2 columns between them: q, k, v, o
        row = next(line for line in result.outlines if line.startswith("  1  "))
        cells = {matrix: row[11 * i + 5 : 11 * i + 9] for i, matrix in enumerate("qkvo")}
        assert cells["k"][2:] == "██"
        assert "█" not in cells["k"][:2] + cells["q"] + cells["v"] + cells["o"]
        assert sum(line.count("█") for line in result.outlines if line[:3].strip().isdigit()) == 2
        result.stdout.fnmatch_lines(["k: 1..*; furthest: L1 H2 1"])

    def test_the_scale_comes_from_the_rules_of_the_drawn_matrices(self, pytester) -> None:
        """A rule written for v and o sets no reach of a run that draws q and k only."""
        model = write_model(pytester, "model")
        rules = rules_file(
            pytester,
            '[[rules]]\nname = "qk"\nmetric = "stable_rank"\nmin = 1.2\nmatrices = ["q", "k"]\n'
            '[[rules]]\nname = "vo"\nmetric = "stable_rank"\nmin = 1.3\nmatrices = ["v", "o"]\n',
        )
        result = pytester.runpytest(
            f"--spectral-model={model}",
            f"--spectral-thresholds={rules}",
            "--spectral-matrices=q,k",
            "--spectral-heatmap=stable_rank",
        )
        result.assert_outcomes(passed=16)
        text = " ".join(result.stdout.str().split())
        legend = text[text.index("stable_rank per head") : text.index("Shade:")]
        assert "one scale for every panel, from the median" in legend
        assert legend.endswith("to 1.2 (rule 'qk' min). ")
        assert "rule 'vo'" in text  # in the header: it applies to no item of this run

    def test_whole_matrices_get_a_layers_by_matrices_map(self, pytester) -> None:
        shape = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=48)
        model = write_checkpoint(
            pytester.path / "mlp", random_llama_weights(shape, seed=3), shape.config()
        )
        result = pytester.runpytest(
            f"--spectral-model={model}", "--spectral-scope=matrix", "--spectral-heatmap=alpha"
        )
        result.stdout.fnmatch_lines(
            [
                "alpha per whole matrix (rows: layers, columns: matrices): both extremes are *",
                "*",
                "     q k v o gate up down ",
                "  0  * ",
                "  1  * ",
                "q: *..*; furthest: L* *",
                "*",
                "down: *..*; furthest: L* *",
            ]
        )
        assert "alpha per head" not in result.stdout.str()

    def test_unknown_heatmap_metric(self, pytester) -> None:
        model = write_model(pytester, "model")
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-heatmap", "erank")
        assert result.ret == pytest.ExitCode.USAGE_ERROR


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class TestHtmlReport:
    def test_self_contained_report(self, pytester) -> None:
        model = write_model(pytester, "model", collapse_k_head_1_of_layer_1)
        (pytester.path / "out").mkdir()
        result = pytester.runpytest(
            f"--spectral-model={model}",
            "--spectral-html=out/report.html",
            f"--spectral-thresholds={rules_file(pytester, COLLAPSED)}",
        )
        result.stdout.fnmatch_lines(["spectral HTML report: *out/report.html"])
        page = (pytester.path / "out/report.html").read_text()
        assert page.count('src="data:image/png;base64,') == 5  # 4 heatmaps + layer 1 curves
        assert "http://" not in page
        assert "https://" not in page
        assert '<table class="candidates">' in page
        assert "collapsed: stable_rank" in page
        # one candidate: the rank-1 K slice (8 x 32) shared by query heads 2 and 3, whose
        # rank-1 factorisation keeps 40 of 256 parameters
        assert page.count('<tr class="failed">') == 1
        assert "<td>1</td><td>2, 3</td><td>k</td><td>failed</td>" in page
        assert "<td>1</td><td>8x32</td><td>216 (84%)</td></tr>" in page

    @pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
    def test_renders_in_headless_chromium(self, pytester) -> None:
        model = write_model(pytester, "model", collapse_k_head_1_of_layer_1)
        pytester.runpytest(f"--spectral-model={model}", "--spectral-html=report.html")
        done = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={pytester.path / 'profile'}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                (pytester.path / "report.html").as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert 'data-images-rendered="5"' in done.stdout
        assert "Low-rank pruning candidates" in done.stdout

    def test_missing_matplotlib_is_explained(self, pytester, monkeypatch) -> None:
        model = write_model(pytester, "model")
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-html=r.html")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            ["ERROR: --spectral-html needs matplotlib: pip install 'pytest-spectral[plot]'"]
        )


def test_parallel_runs_gate_and_report_the_same(pytester) -> None:
    original = write_model(pytester, "original")
    report_of(pytester, original, "baseline.json")
    perturbed = write_model(pytester, "perturbed", scale_q_head_1_of_layer_0)
    rules = rules_file(pytester, DRIFT_RULES)
    outputs = {}
    for label, extra in (("one", ("-p", "no:xdist")), ("two", ("-n", "2"))):
        result = pytester.runpytest_subprocess(
            f"--spectral-model={perturbed}",
            "--spectral-baseline=baseline.json",
            f"--spectral-thresholds={rules}",
            f"--spectral-report={label}.json",
            f"--spectral-calibrate={label}.toml",
            f"--spectral-html={label}.html",
            *extra,
        )
        result.assert_outcomes(passed=31, failed=1)
        outputs[label] = {
            "items": json.loads((pytester.path / f"{label}.json").read_text())["items"],
            "rules": [
                line
                for line in (pytester.path / f"{label}.toml").read_text().splitlines()
                if not line.startswith("# at ")
            ],
            "images": (pytester.path / f"{label}.html").read_text().count("data:image/png"),
        }
    assert outputs["one"] == outputs["two"]
