"""Gating checkpoints in CI: baselines, calibration, warn-only runs and readable reports."""

from __future__ import annotations

import hashlib
import json
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
    pytester.runpytest(f"--spectral-model={model}", "--spectral-report", name, *extra)
    return pytester.path / name


class TestBaseline:
    def test_scaled_head_fails_exactly_there(self, pytester) -> None:
        original = write_model(pytester, "original")
        baseline = report_of(pytester, original, "baseline.json")
        perturbed = write_model(pytester, "perturbed", scale_q_head_1_of_layer_0)
        result = pytester.runpytest(
            f"--spectral-model={perturbed}",
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
            f"--spectral-model={model}",
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
            f"--spectral-model={model}",
            "--spectral-baseline",
            str(baseline),
            "--spectral-thresholds",
            rules_file(pytester, DRIFT_RULES),
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
        result = pytester.runpytest(
            f"--spectral-model={model}", "--spectral-baseline", str(baseline)
        )
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
            "--spectral-thresholds",
            rules_file(pytester, DRIFT_RULES),
        )
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*rule 'drift' bounds the change against a baseline; give*"])

    def test_not_a_report(self, pytester) -> None:
        model = write_model(pytester, "model")
        (pytester.path / "x.json").write_text("[]")
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-baseline", "x.json")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*x.json: not a pytest-spectral report*"])


class TestCalibration:
    def test_round_trip_passes_and_a_planted_collapse_fails_there(self, pytester) -> None:
        healthy = write_model(pytester, "healthy")
        pytester.runpytest(
            f"--spectral-model={healthy}", "--spectral-calibrate", "calibrated.toml"
        ).assert_outcomes(passed=32)
        rules = (pytester.path / "calibrated.toml").read_text()
        assert "# q heads (n=8): observed" in rules
        assert 'name = "calibrated-k-effective_rank"' in rules
        args = ("--spectral-thresholds", "calibrated.toml")
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
            f"--spectral-model={model}",
            "--spectral-warn-only",
            "--spectral-thresholds",
            rules_file(
                pytester, '[[rules]]\nname = "collapsed"\nmetric = "stable_rank"\nmin = 1.5\n'
            ),
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


class TestHeatmap:
    def test_terminal_heatmap_of_a_32_by_32_model_fits_80_columns(self) -> None:
        records = [
            {
                "layer": layer,
                "head": head,
                "matrix": matrix,
                "metrics": {"effective_rank": float(layer * 32 + head)},
            }
            for layer in range(32)
            for head in range(32)
            for matrix in "qkvo"
        ]
        text = render_heatmap(records, "effective_rank", layers=32, heads=32, width=80, color=False)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80
        assert sum(line.startswith("q: 0..1023;") for line in lines) == 1
        assert sum(line.startswith(" 31  ") for line in lines) == 2  # two panels a row

    def test_heatmap_in_the_summary(self, pytester) -> None:
        model = write_model(pytester, "model")
        result = pytester.runpytest(
            f"--spectral-model={model}", "--spectral-heatmap", "effective_rank"
        )
        result.stdout.fnmatch_lines(["effective_rank per head (rows: layers, *", "q *k *v *o *"])

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

    @pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
    def test_renders_in_headless_chromium(self, pytester) -> None:
        model = write_model(pytester, "model", collapse_k_head_1_of_layer_1)
        pytester.runpytest(f"--spectral-model={model}", "--spectral-html", "report.html")
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
        result = pytester.runpytest(f"--spectral-model={model}", "--spectral-html", "r.html")
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
