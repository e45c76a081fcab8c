"""A training run's spectral history, end to end: six checkpoints of a synthetic run in which
query head 2 of layer 1 collapses progressively from the third checkpoint on, each judged by
the plugin with the reports of the checkpoints before it.

Expected values come from numpy float64 SVD of the weights written, never from the plugin:
which (step, head) the trend rule breaks follows from the stable ranks numpy computes and the
rule's definition (the change against the earliest of the last ``window`` reports)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pytest_spectral.reporting.history.page import layer_series
from pytest_spectral.reporting.history.reports import report_sources
from pytest_spectral.reporting.history.table import build_table
from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, mlp=False)
STEPS = (100, 200, 300, 400, 500, 600)
#: the factor on every singular value but the first of the collapsing head, per checkpoint
COLLAPSE = (1.0, 1.0, 0.8, 0.6, 0.4, 0.2)
LAYER, HEAD = 1, 2
WINDOW, MIN_CHANGE = 3, -0.5
RULES = f"""\
[[rules]]
name = "collapsing"
metric = "stable_rank"
min_change = {MIN_CHANGE}
window = {WINDOW}
"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def checkpoint_weights(index: int) -> dict[str, torch.Tensor]:
    """Checkpoint ``index``: a random model drifting by 1% of fresh noise per checkpoint,
    with head (LAYER, HEAD)'s Q slice collapsing towards rank one."""
    tensors = random_llama_weights(SHAPE, seed=5)
    noise = torch.Generator().manual_seed(17)
    for _ in range(index + 1):
        for tensor in tensors.values():
            tensor += 0.01 * tensor.std() * torch.randn(tensor.shape, generator=noise)
    rows = slice(HEAD * SHAPE.head_dim, (HEAD + 1) * SHAPE.head_dim)
    head = tensors[attention_name(LAYER, "q")][rows].double()
    u, s, vh = torch.linalg.svd(head, full_matrices=False)
    s[1:] *= COLLAPSE[index]
    tensors[attention_name(LAYER, "q")][rows] = (u * s @ vh).float()
    return tensors


def head_slices(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, int, str], np.ndarray]:
    """(layer, query head, matrix) -> the slice the item reads (K/V shared by groups)."""
    group = SHAPE.heads // SHAPE.kv_heads
    d = SHAPE.head_dim
    slices = {}
    for layer in range(SHAPE.layers):
        for head in range(SHAPE.heads):
            kv = head // group
            for matrix, weight in (("q", head), ("k", kv), ("v", kv)):
                w = tensors[attention_name(layer, matrix)].double().numpy()
                slices[(layer, head, matrix)] = w[weight * d : (weight + 1) * d]
            o = tensors[attention_name(layer, "o")].double().numpy()
            slices[(layer, head, "o")] = o[:, head * d : (head + 1) * d]
    return slices


def stable_rank(matrix: np.ndarray) -> float:
    sv = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sum(sv**2) / sv[0] ** 2)


def expected_breaks(ranks: list[dict[tuple[int, int, str], float]]) -> set[tuple[int, tuple]]:
    """(checkpoint index, item) the trend rule breaks, from its definition."""
    breaks = set()
    for index in range(1, len(ranks)):
        reference = ranks[max(0, index - WINDOW + 1)]
        for item, value in ranks[index].items():
            if (value - reference[item]) / abs(reference[item]) < MIN_CHANGE:
                breaks.add((index, item))
    return breaks


def run_history(pytester: pytest.Pytester) -> tuple[Path, list[dict], list[dict]]:
    """Write the six checkpoints (``checkpoint-100`` ...), run the plugin on each with the
    reports so far as its history; returns the reports directory, the reports, and numpy's
    stable rank of every item per checkpoint. The last run also writes ``run.html``."""
    reports = pytester.mkdir("reports")
    rules = pytester.path / "rules.toml"
    rules.write_text(RULES)
    written, ranks = [], []
    for index, step in enumerate(STEPS):
        tensors = checkpoint_weights(index)
        model = write_checkpoint(
            pytester.path / "run" / f"checkpoint-{step}",
            tensors,
            SHAPE.config(),
            dtype=torch.float32,
        )
        ranks.append({item: stable_rank(w) for item, w in head_slices(tensors).items()})
        html = ["--spectral-html=run.html"] if index == len(STEPS) - 1 else []
        pytester.runpytest(
            f"--spectral-model={model}",
            f"--spectral-thresholds={rules}",
            f"--spectral-history={reports}",
            f"--spectral-report={reports / f'step-{step}.json'}",
            "-p",
            "no:cacheprovider",
            *html,
        )
        written.append(json.loads((reports / f"step-{step}.json").read_text()))
    return reports, written, ranks


def failed_items(report: dict) -> set[tuple[int, int, str]]:
    return {
        (r["layer"], r["head"], r["matrix"]) for r in report["items"] if r["outcome"] == "failed"
    }


def test_the_trend_rule_fails_the_collapsing_head_from_the_step_it_crosses_its_bound(
    pytester: pytest.Pytester,
) -> None:
    reports, written, ranks = run_history(pytester)
    breaks = expected_breaks(ranks)
    # the synthetic run does what it claims: only the collapsing head, and not at once
    assert breaks == {(i, (LAYER, HEAD, "q")) for i in (3, 4, 5)}
    for index, report in enumerate(written):
        assert report["schema_version"] == 4
        assert report["step"] == {
            "label": str(STEPS[index]),
            "number": STEPS[index],
            "source": "directory name",
        }
        assert failed_items(report) == {item for i, item in breaks if i == index}
    (broken,) = next(r for r in written[3]["items"] if r["outcome"] == "failed")["broken_rules"]
    assert broken["window"] == WINDOW
    assert broken["reference_step"] == "200"
    reference = ranks[1][(LAYER, HEAD, "q")]
    assert broken["baseline"] == pytest.approx(reference, rel=1e-9)
    assert broken["value"] == pytest.approx(ranks[3][(LAYER, HEAD, "q")], rel=1e-9)

    # the HTML report of the last run carries the history, this run included
    page = (pytester.path / "run.html").read_text()
    assert "Training history: failing heads" in page
    failing = page.split('<table class="failing">')[1].split("</table>")[0]
    assert failing.count("<tr>") == 2  # the header and the collapsing head
    assert (
        "<td>spectral::layer01::head02-q</td><td>400</td><td>3</td>"
        "<td>failed in the report; trend rule collapsing</td>"
    ) in failing

    # the command draws the same history from the reports alone, and gates on the last one
    result = subprocess.run(
        [sys.executable, "-m", "pytest_spectral.reporting.history", str(reports),
         "-o", str(pytester.path / "history.html"), "--rules", str(pytester.path / "rules.toml")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "breaks trend rule(s) collapsing" in result.stderr
    history = (pytester.path / "history.html").read_text()
    assert history.split('<table class="failing">')[1].split("</table>")[0] == failing
    moved = history.split('<table class="moved">')[1].split("</table>")[0]
    assert moved.split("</tr>")[1].startswith("<tr><td>spectral::layer01::head02-q</td>")

    # what the layer plots draw: each layer's median and worst (lowest) head, as numpy has them
    table = build_table(report_sources([reports], what="test"), ["stable_rank"])
    assert table.labels == [str(s) for s in STEPS]
    for layer in range(SHAPE.layers):
        for matrix in "qkvo":
            median, worst = layer_series(table, "stable_rank", matrix, layer)
            values = np.array([[r[(layer, h, matrix)] for h in range(SHAPE.heads)] for r in ranks])
            np.testing.assert_allclose(median, np.median(values, axis=1), rtol=1e-9)
            np.testing.assert_allclose(worst, values.min(axis=1), rtol=1e-9)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_the_history_page_renders_in_headless_chromium(pytester: pytest.Pytester) -> None:
    reports, _, _ = run_history(pytester)
    page = pytester.path / "history.html"
    subprocess.run(
        [sys.executable, "-m", "pytest_spectral.reporting.history", str(reports), "-o", str(page)],
        check=True, timeout=300,
    )  # fmt: skip
    shutil.copy(page, Path(str(pytester.path)).parent / "history-page.html")  # for a person
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={pytester.path / 'profile'}", "--virtual-time-budget=10000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    images = page.read_text().count('src="data:image/png;base64,')
    # per metric (4): layers and moved heads; and the failing heads' curves
    assert images == 9
    assert f'data-images-rendered="{images}"' in dom
    for table in ("reports", "failing", "moved"):
        assert f'<table class="{table}">' in dom
