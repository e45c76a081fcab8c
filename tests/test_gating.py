"""Gating checkpoints in CI: baselines, calibration, warn-only runs and readable reports."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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
    pytester.runpytest("--spectral-model", str(model), "--spectral-report", name, *extra)
    return pytester.path / name


class TestBaseline:
    def test_scaled_head_fails_exactly_there(self, pytester) -> None:
        original = write_model(pytester, "original")
        baseline = report_of(pytester, original, "baseline.json")
        perturbed = write_model(pytester, "perturbed", scale_q_head_1_of_layer_0)
        result = pytester.runpytest(
            "--spectral-model",
            str(perturbed),
            "--spectral-baseline",
            str(baseline),
            "--spectral-thresholds",
            rules_file(pytester, DRIFT_RULES),
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
            "--spectral-model",
            str(model),
            "--spectral-baseline",
            str(baseline),
            "--spectral-thresholds",
            rules_file(pytester, DRIFT_RULES),
        )
        result.assert_outcomes(passed=32)

    def test_items_missing_from_the_baseline_are_reported(self, pytester) -> None:
        model = write_model(pytester, "model")
        baseline = report_of(pytester, model, "partial.json", "--spectral-layers", "0")
        result = pytester.runpytest(
            "--spectral-model",
            str(model),
            "--spectral-baseline",
            str(baseline),
            "--spectral-thresholds",
            rules_file(pytester, DRIFT_RULES),
        )
        result.assert_outcomes(passed=16, failed=16)
        result.stdout.fnmatch_lines(
            ["  FAIL drift: spectral_norm = * has no baseline value to compare with*"]
        )

    def test_baseline_of_another_layout_is_a_usage_error(self, pytester) -> None:
        model = write_model(pytester, "model")
        other = LlamaShape(layers=2, heads=4, kv_heads=4, head_dim=8, hidden=32, mlp=False)
        different = write_checkpoint(
            pytester.path / "other", random_llama_weights(other), other.config()
        )
        baseline = report_of(pytester, different, "other.json")
        result = pytester.runpytest(
            "--spectral-model", str(model), "--spectral-baseline", str(baseline)
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(
            [
                "ERROR: *other.json: baseline is for a different model layout: "
                "num_key_value_heads is 4 there and 2 here"
            ]
        )

    def test_relative_rule_without_baseline_is_a_usage_error(self, pytester) -> None:
        model = write_model(pytester, "model")
        result = pytester.runpytest(
            "--spectral-model",
            str(model),
            "--spectral-thresholds",
            rules_file(pytester, DRIFT_RULES),
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*rule 'drift' bounds the change against a baseline; give*"])

    def test_not_a_report(self, pytester) -> None:
        model = write_model(pytester, "model")
        (pytester.path / "x.json").write_text("[]")
        result = pytester.runpytest("--spectral-model", str(model), "--spectral-baseline", "x.json")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*x.json: not a pytest-spectral report*"])


class TestCalibration:
    def test_round_trip_passes_and_a_planted_collapse_fails_there(self, pytester) -> None:
        healthy = write_model(pytester, "healthy")
        pytester.runpytest(
            "--spectral-model", str(healthy), "--spectral-calibrate", "calibrated.toml"
        ).assert_outcomes(passed=32)
        rules = (pytester.path / "calibrated.toml").read_text()
        assert "# q heads (n=8): observed" in rules
        assert 'name = "calibrated-k-effective_rank"' in rules
        args = ("--spectral-thresholds", "calibrated.toml")
        pytester.runpytest("--spectral-model", str(healthy), *args).assert_outcomes(passed=32)
        collapsed = write_model(pytester, "collapsed", collapse_k_head_1_of_layer_1)
        result = pytester.runpytest("--spectral-model", str(collapsed), *args)
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
                "--spectral-model",
                str(model),
                "--spectral-calibrate",
                f"m{margin}.toml",
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


class TestWarnOnly:
    def test_nothing_fails_and_candidates_are_listed(self, pytester) -> None:
        model = write_model(pytester, "model", collapse_k_head_1_of_layer_1)
        result = pytester.runpytest(
            "--spectral-model",
            str(model),
            "--spectral-warn-only",
            "--spectral-thresholds",
            rules_file(
                pytester, '[[rules]]\nname = "collapsed"\nmetric = "stable_rank"\nmin = 1.5\n'
            ),
        )
        assert result.ret == pytest.ExitCode.OK
        result.assert_outcomes(passed=32, warnings=2)
        result.stdout.fnmatch_lines(["*Low-rank pruning candidates*", "*L1 H2-3 k*collapsed*"])


def heatmap_records() -> list[dict]:
    """3 layers x 5 heads, different values in every panel (hand-computed shades below).

    q: layer * 5 + head (0..14); k: 100 minus that (86..100); v: head * 3 + layer;
    o: as q, but undefined (nan) at layer 1 head 2 and missing at layer 2 head 4.
    """
    records = []
    for layer in range(3):
        for head in range(5):
            values = {
                "q": layer * 5 + head,
                "k": 100 - (layer * 5 + head),
                "v": head * 3 + layer,
                "o": math.nan if (layer, head) == (1, 2) else layer * 5 + head,
            }
            for matrix, value in values.items():
                if (matrix, layer, head) != ("o", 2, 4):
                    records.append(
                        {
                            "layer": layer,
                            "head": head,
                            "matrix": matrix,
                            "metrics": {"effective_rank": float(value)},
                        }
                    )
    return records


class TestHeatmap:
    # Shades are quintiles of each panel (numpy's linear quantiles; a value equal to an edge
    # takes the upper shade). q, 0..14: edges 2.8, 5.6, 8.4, 11.2, so 0-2 ' ', 3-5 '░',
    # 6-8 '▒', 9-11 '▓', 12-14 '█'. k mirrors q. v: each layer runs through 0..14 in steps
    # of 3. o: 13 finite values 0..13 without 7, edges 2.4, 4.8, 8.2, 10.6.
    PANELS = (
        "q: 0..14    k: 86..100  v: 0..14    o: 0..13",
        "  0     ░░    0  ███▓▓    0   ░▒▓█    0     ░░",
        "  1  ░▒▒▒▓    1  ▓▒▒▒░    1   ░▒▓█    1  ▒▒x▒▓",
        "  2  ▓▓███    2  ░░       2   ░▒▓█    2  ▓███·",
    )

    def test_each_panel_shades_its_own_matrix_by_hand(self) -> None:
        text = render_heatmap(
            heatmap_records(), "effective_rank", layers=3, heads=5, width=80, color=False
        )
        lines = [line.rstrip() for line in text.splitlines()]
        assert lines[0].startswith("effective_rank per head (rows: layers, columns: heads;")
        assert lines[-4:] == list(self.PANELS)

    def test_panels_wrap_to_the_width(self) -> None:
        # each panel is 5 + 5 heads wide plus 2 of gap: three fit in 40 columns
        text = render_heatmap(
            heatmap_records(), "effective_rank", layers=3, heads=5, width=40, color=False
        )
        lines = [line.rstrip() for line in text.splitlines()]
        assert lines[-8:] == [
            *(line[:34].rstrip() for line in self.PANELS),
            *(line[36:] for line in self.PANELS),
        ]

    def test_terminal_heatmap_of_a_32_by_32_model_fits_80_columns(self) -> None:
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
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80
        panel_rows = [line for line in lines if line.startswith(("q: ", "v: ", "  0  ", " 31  "))]
        assert [line.rstrip() for line in panel_rows] == [
            "q: 0..1.02e+03                         k: -1.02e+03..0",
            "  0  " + " " * 32 + "    0  " + "█" * 32,
            " 31  " + "█" * 32 + "   31",  # k's last layer is its lowest: blank
            "v: 0..1.02e+03                         o: -1.02e+03..0",
            "  0  " + " " * 32 + "    0  " + "█" * 32,
            " 31  " + "█" * 32 + "   31",
        ]

    def test_heatmap_in_the_summary(self, pytester) -> None:
        """K/V head 1 of layer 1 (query heads 2 and 3) collapsed: only the k panel shows it,
        as the lowest shade in both of its query heads' cells."""
        model = write_model(pytester, "model", collapse_k_head_1_of_layer_1)
        result = pytester.runpytest(
            "--spectral-model", str(model), "--spectral-heatmap", "effective_rank"
        )
        result.stdout.fnmatch_lines(["effective_rank per head (rows: layers, *", "q: *k: *"])
        header = next(line for line in result.outlines if line.startswith("q: "))
        row = next(line for line in result.outlines if line.startswith("  1  "))
        # panels are 5 + 4 heads wide with 2 columns between them: q, k, v, o
        k_header, k_cells = header[11:20], row[16:20]
        assert k_header.startswith("k: 1..")  # a rank-1 slice has effective rank 1
        assert k_cells[2:] == "  "
        assert k_cells[0] == k_cells[1] != " "  # one K/V head, one value, for query heads 0, 1

    def test_unknown_heatmap_metric(self, pytester) -> None:
        model = write_model(pytester, "model")
        result = pytester.runpytest("--spectral-model", str(model), "--spectral-heatmap", "erank")
        assert result.ret == pytest.ExitCode.USAGE_ERROR


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class TestHtmlReport:
    def test_self_contained_report(self, pytester) -> None:
        model = write_model(pytester, "model", collapse_k_head_1_of_layer_1)
        result = pytester.runpytest(
            "--spectral-model",
            str(model),
            "--spectral-html",
            "out/report.html",
            "--spectral-thresholds",
            rules_file(
                pytester, '[[rules]]\nname = "collapsed"\nmetric = "stable_rank"\nmin = 1.5\n'
            ),
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
        pytester.runpytest("--spectral-model", str(model), "--spectral-html", "report.html")
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
        result = pytester.runpytest("--spectral-model", str(model), "--spectral-html", "r.html")
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
            "--spectral-model",
            str(perturbed),
            "--spectral-baseline",
            "baseline.json",
            "--spectral-thresholds",
            rules,
            "--spectral-report",
            f"{label}.json",
            "--spectral-calibrate",
            f"{label}.toml",
            "--spectral-html",
            f"{label}.html",
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
