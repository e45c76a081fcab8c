"""Time and memory of a history page from many large reports (``spectral-history``).

Writes ``--reports`` synthetic JSON reports of a Llama-3-8B-shaped run (32 layers x 32 query
heads x q, k, v, o = 4,096 head items, head_dim 128 singular values each, every built-in
metric key present) into ``--dir``, one head collapsing over the run, then builds the page in
a fresh process and prints its wall time and peak RSS. The reports are deleted afterwards
unless ``--keep``.

    python benchmarks/bench_history.py --reports 200 --dir /tmp/history-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pytest_spectral.judging.metrics import METRICS
from pytest_spectral.results import SCHEMA

LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 32, 32, 8, 128, 4096


def write_reports(directory: Path, count: int) -> int:
    """The reports, each about 14 MB; returns the bytes written."""
    generator = np.random.default_rng(0)
    base = np.sort(generator.gamma(4.0, 0.05, size=(LAYERS * HEADS * 4, HEAD_DIM)), axis=1)[:, ::-1]
    places = [
        (layer, head, matrix)
        for layer in range(LAYERS)
        for head in range(HEADS)
        for matrix in ("q", "k", "v", "o")
    ]
    written = 0
    for index in range(count):
        spectra = base * (1 + 0.01 * generator.standard_normal(base.shape))
        spectra[0, 1:] *= max(0.05, 1 - index / count)  # layer 0, head 0, q collapses
        squares = spectra**2
        stable = squares.sum(axis=1) / squares[:, 0]
        items = []
        for row, (layer, head, matrix) in enumerate(places):
            metrics = {key: 1.0 for key in METRICS}
            metrics["stable_rank"] = float(stable[row])
            metrics["top_k_ratio"] = float(squares[row, :4].sum() / squares[row].sum())
            metrics["first_last_ratio"] = float(spectra[row, 0] / spectra[row, -1])
            metrics["effective_rank"] = float(stable[row] * 1.5)
            items.append(
                {
                    "nodeid": f"spectral::layer{layer:02d}::head{head:02d}-{matrix}",
                    "layer": layer,
                    "scope": "head",
                    "head": head,
                    "matrix": matrix,
                    "kv_head": head // (HEADS // KV_HEADS) if matrix in "kv" else None,
                    "shape": [HEAD_DIM, HIDDEN],
                    "status": "ok",
                    "outcome": "failed" if row == 0 and index > count // 2 else "passed",
                    "singular_values": spectra[row].tolist(),
                    "metrics": metrics,
                    "broken_rules": [],
                }
            )
        report = {
            "schema": SCHEMA,
            "schema_version": 3,
            "created": f"2026-01-01T00:00:{index % 60:02d}+00:00",
            "step": {"label": str(100 * (index + 1)), "number": 100 * (index + 1),
                     "source": "directory name"},
            "model": {"model_type": "llama", "num_hidden_layers": LAYERS,
                      "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                      "head_dim": HEAD_DIM, "hidden_size": HIDDEN},
            "items": items,
        }  # fmt: skip
        text = json.dumps(report)
        (directory / f"step-{100 * (index + 1):06d}.json").write_text(text)
        written += len(text)
    return written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reports", type=int, default=200)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--keep", action="store_true")
    arguments = parser.parse_args()
    arguments.dir.mkdir(parents=True, exist_ok=False)
    started = time.perf_counter()
    size = write_reports(arguments.dir, arguments.reports)
    print(f"wrote {arguments.reports} reports, {size / 2**20:.0f} MiB, "
          f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
    page = arguments.dir.parent / f"{arguments.dir.name}.html"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest_spectral.reporting.history", str(arguments.dir),
         "-o", str(page)],
        check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    print(
        f"history page: {seconds:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.0f} MB, "
        f"page {page.stat().st_size / 2**20:.1f} MiB"
    )
    if not arguments.keep:
        shutil.rmtree(arguments.dir)


if __name__ == "__main__":
    main()
