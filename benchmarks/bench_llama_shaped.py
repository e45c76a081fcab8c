"""Benchmark pytest-spectral on a Llama-3-8B-shaped checkpoint, against baselines run alongside.

Writes (once) a random bf16 checkpoint with Llama-3-8B's attention shapes (32 layers, 32 query
heads, 8 K/V heads, head_dim 128, hidden 4096; attention weights only by default, 2.5 GB), then
times, each in a fresh process:

* ``baseline``: the plain script the plugin must stay within 1.5x of: read each layer's
  Q/K/V/O once through safetensors (mmap), upcast to float64, per-head Gram matrices plus
  ``eigvalsh``, for all distinct head slices;
* ``plugin-cold``: ``pytest --spectral-model=DIR --spectral-thresholds ... --spectral-no-cache``,
  all items, end to end;
* ``plugin-cached``: the same with the cache warm and a different rules file;
* ``empty-pytest``: pytest running as many trivial items as the plugin collects;
* ``seed``: the seed article's method on a few items (every shard rescanned for the layer's
  tensors, float32 numpy SVD of one head), extrapolated to all items. It does not include the
  article's construction of a one-layer ``LlamaModel``, so the real method is slower still.

Times are medians of ``--repeat`` runs; ratios are against the baseline measured in the same
invocation, because absolute seconds on a shared machine are noise. Peak RSS is the maximum
resident set of each measured process.

    python benchmarks/bench_llama_shaped.py                 # full 32 layers
    python benchmarks/bench_llama_shaped.py --layers 4      # quicker
    python benchmarks/bench_llama_shaped.py --device cuda   # adds baseline and plugin rows on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Peak resident memory of the measuring process itself. (ru_maxrss would not do: it survives
#: fork and exec, so a child would report this script's own peak.)
PEAK = 'int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024'

BASELINE = """
import sys, json, time
from pathlib import Path
import torch
from safetensors import safe_open
torch.set_num_threads({threads})
root = Path(sys.argv[1])
index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
config = json.loads((root / "config.json").read_text())
layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
kv, d = config["num_key_value_heads"], config["head_dim"]
handles = {{}}
def tensor(name):
    shard = index[name]
    if shard not in handles:
        handles[shard] = safe_open(str(root / shard), framework="pt")
    return handles[shard].get_tensor(name)
start = time.perf_counter()
count = 0
for layer in range(layers):
    for m, n in (("q", heads), ("k", kv), ("v", kv), ("o", heads)):
        w = tensor(f"model.layers.{{layer}}.self_attn.{{m}}_proj.weight")
        w = w.to("{device}").to(torch.float64)
        blocks = w.view(w.shape[0], n, d).permute(1, 2, 0) if m == "o" else w.view(n, d, -1)
        gram = blocks @ blocks.transpose(1, 2)
        values = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
        count += values.shape[0]
values.sum().item()  # waits for the device to finish
print(json.dumps({{"slices": count, "rss_mb": {peak}}}))
"""

SEED = """
import sys, json, os, time
import numpy as np
import torch
from safetensors import safe_open
root, items = sys.argv[1], json.loads(sys.argv[2])
config = json.load(open(os.path.join(root, "config.json")))
d, group = config["head_dim"], config["num_attention_heads"] // config["num_key_value_heads"]
start = time.perf_counter()
for layer, matrix, head in items:
    state = {}
    for file in [f for f in os.listdir(root) if f.endswith(".safetensors")]:
        with safe_open(os.path.join(root, file), framework="pt") as f:
            for key in f.keys():
                if f"layers.{layer}." in key:
                    state[key] = f.get_tensor(key)
    w = state[f"model.layers.{layer}.self_attn.{matrix}_proj.weight"].float().numpy()
    h = head if matrix in ("q", "o") else head // group
    block = w[:, h * d:(h + 1) * d] if matrix == "o" else w[h * d:(h + 1) * d]
    np.linalg.svd(block, compute_uv=False)
print(json.dumps({"per_item_s": (time.perf_counter() - start) / len(items), "rss_mb": PEAK}))
"""

PYTEST = """
import json, sys
import pytest
code = pytest.main(sys.argv[1:])
print(json.dumps({"exit": int(code), "rss_mb": PEAK}))
"""

RULES_A = """
[[rules]]
name = "concentrated"
metric = "top_k_ratio"
max = 0.9
[[rules]]
name = "collapsed"
metric = "effective_rank"
min = 16
"""

RULES_B = (
    RULES_A.replace("max = 0.9", "max = 0.8")
    + """
[[rules]]
metric = "stable_rank"
min = 2
severity = "warn"
"""
)


def write_model(directory: Path, layers: int, attention_only: bool) -> None:
    if (directory / "config.json").exists():
        return
    sys.path.insert(0, str(REPO))
    import torch

    from pytest_spectral.testing.synthetic import LlamaShape, random_llama_weights, write_checkpoint

    shape = LlamaShape(
        layers=layers,
        heads=32,
        kv_heads=8,
        head_dim=128,
        hidden=4096,
        intermediate=14336,
        vocab=128256,
    )
    print(f"writing {directory} ({layers} layers) ...", flush=True)
    tensors = random_llama_weights(shape, seed=0, attention_only=attention_only)
    config = shape.config()
    config["head_dim"] = 128
    write_checkpoint(directory, tensors, config, dtype=torch.bfloat16, shards=max(2, layers // 4))


def timed(command: list[str], cwd: Path) -> tuple[float, dict[str, object]]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{output}")
    return elapsed, json.loads(lines[-1])


def median_run(command: list[str], cwd: Path, repeat: int) -> tuple[float, float]:
    runs = [timed(command, cwd) for _ in range(repeat)]
    return statistics.median(t for t, _ in runs), max(float(r["rss_mb"]) for _, r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="write MLP and embeddings too (16 GB)")
    parser.add_argument("--dir", type=Path, default=REPO / ".bench")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed-items", type=int, default=3)
    parser.add_argument("--xdist", type=int, default=0, help="also time -n N")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--device",
        default="cpu",
        help="also time the baseline and the plugin on this device (cuda, cuda:N, mps)",
    )
    args = parser.parse_args()

    model = args.dir / f"llama3-8b-shaped-{args.layers}l{'-full' if args.full else ''}"
    write_model(model, args.layers, attention_only=not args.full)
    work = args.dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "rules_a.toml").write_text(RULES_A)
    (work / "rules_b.toml").write_text(RULES_B)
    items = args.layers * 32 * 4
    (work / "test_empty.py").write_text(
        textwrap.dedent(f"""
        import pytest
        @pytest.mark.parametrize("i", range({items}))
        def test_item(i):
            pass
        """)
    )
    py = sys.executable
    base_pytest = [
        py,
        "-c",
        PYTEST.replace("PEAK", PEAK),
        "-q",
        "-p",
        "no:randomly",
        "--no-header",
        "-o",
        "addopts=",
    ]
    spectral = [*base_pytest, f"--spectral-model={model}"]
    rules_a_cold = ["--spectral-thresholds", "rules_a.toml", "--spectral-no-cache"]
    # The CPU rows stay on the CPU even where auto would pick a GPU; --device adds its own rows.
    cold = [*spectral, *rules_a_cold, "--spectral-device", "cpu"]

    def baseline_on(device: str) -> list[str]:
        script = BASELINE.format(threads=args.threads, peak=PEAK, device=device)
        return [py, "-c", script, str(model)]

    results: dict[str, tuple[float, float]] = {}
    results["baseline"] = median_run(baseline_on("cpu"), work, args.repeat)
    results["plugin-cold"] = median_run(cold, work, args.repeat)
    if args.device != "cpu":
        results[f"baseline {args.device}"] = median_run(baseline_on(args.device), work, args.repeat)
        on_device = [*spectral, *rules_a_cold, "--spectral-device", args.device]
        results[f"plugin-cold {args.device}"] = median_run(on_device, work, args.repeat)
    timed([*spectral, "--spectral-thresholds", "rules_a.toml", "--cache-clear"], work)  # warm
    results["plugin-cached"] = median_run(
        [*spectral, "--spectral-thresholds", "rules_b.toml"], work, args.repeat
    )
    results["empty-pytest"] = median_run([*base_pytest, "test_empty.py"], work, args.repeat)
    if args.xdist:
        parallel = [*cold, "-n", str(args.xdist), "--dist", "loadscope"]
        results[f"plugin-cold -n {args.xdist}"] = median_run(parallel, work, args.repeat)
    sample = [[(5 + i) % args.layers, "qkvo"[i % 4], 3] for i in range(args.seed_items)]
    _, seed_out = timed(
        [py, "-c", SEED.replace("PEAK", PEAK), str(model), json.dumps(sample)], work
    )
    per_item = float(seed_out["per_item_s"])
    results["seed (extrapolated)"] = (per_item * items, float(seed_out["rss_mb"]))

    baseline = results["baseline"][0]
    empty = results["empty-pytest"][0]
    print(f"\n{args.layers} layers, {items} items, {os.cpu_count()} CPUs, median of {args.repeat}")
    print(f"{'run':28} {'seconds':>10} {'x baseline':>11} {'x empty':>8} {'peak RSS MB':>12}")
    for name, (seconds, rss) in results.items():
        print(
            f"{name:28} {seconds:10.2f} {seconds / baseline:11.2f} {seconds / empty:8.2f} "
            f"{rss:12.0f}"
        )
    print(f"seed method: {per_item:.2f} s per item over {len(sample)} items")
    if args.json:
        args.json.write_text(
            json.dumps({k: {"seconds": v[0], "rss_mb": v[1]} for k, v in results.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
