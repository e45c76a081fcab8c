"""Benchmark pytest-spectral on Llama-3-8B-shaped checkpoints against the floor script.

Writes (once, under ``--dir``) two bf16 checkpoints with Llama-3-8B's shapes (32 layers, 32
query heads, 8 K/V heads, head_dim 128, hidden 4096; with ``--full``, the default, also the
MLP, embeddings and LM head, 16 GB in shards of at most 2 GB):

* ``trained-like``: Q and K heads ``U diag(s) V^T`` with Haar-random factors and condition
  numbers log-uniform over 10..1e5 before bf16 rounding, V and O flatter (2..30), as trained
  attention is; about half the Q/K heads are then beyond the Gram route's trust bound;
* ``isotropic``: Gaussian weights (every head's condition number near 1.4).

It then times, each in a fresh process, alternating so that load on a shared machine hits
every row alike:

* ``floor``: the plain script the plugin is measured against: per layer, read Q/K/V/O once
  through safetensors (mmap), upcast to float64, per-head Gram matrices plus ``eigvalsh``;
* ``plugin``: ``pytest --spectral-model=DIR --spectral-thresholds ... --spectral-no-cache``,
  every item (4096 for 32 layers), end to end (decomposing in a child process, as
  ``--spectral-subprocess=auto`` does for a checkpoint this size); ``plugin, in one
  process``: the same with ``--spectral-subprocess=off``;
* ``plugin-cached``: the same with the cache warm and a different rules file, against
* ``empty-pytest``: pytest running as many trivial items;
* with ``--xdist N``, the plugin under ``-n N``; with ``--device cuda``, floor and plugin on
  the GPU; with ``--seed-items N``, the seed article's per-item method, extrapolated.

Each row gives the median wall time, the spread (min-max) over ``--repeat`` runs, the median
CPU time (user + system of the process and its children) and the peak RSS (of pytest's
process plus its decomposing child's: an upper bound, as their peaks need not coincide);
ratios are of medians measured in this one invocation, never across invocations. At the end
it prints the tables as Markdown, ready for the README.

    python benchmarks/bench_llama_shaped.py                       # 32 layers, 5 runs each
    python benchmarks/bench_llama_shaped.py --layers 4 --repeat 3  # quicker
    python benchmarks/bench_llama_shaped.py --device cuda          # adds GPU rows
    python benchmarks/bench_llama_shaped.py --cached-only          # only the re-run row
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Peak resident memory of the measuring process itself. (ru_maxrss would not do: it survives
#: fork and exec, so a child would report this script's own peak.)
PEAK = 'int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024'
SHARD_BYTES = 2 * 2**30

FLOOR = """
import sys, json
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
import json, resource, sys
import pytest
code = pytest.main(sys.argv[1:])
# pytest's process, plus the child that decomposes (--spectral-subprocess) if one ran: its
# peak, from the kernel's record of waited-for children (KiB on Linux).
child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"exit": int(code), "rss_mb": PEAK + child_mb}))
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


def write_model(directory: Path, layers: int, kind: str, full: bool) -> None:
    """Write the checkpoint layer by layer into shards of at most 2 GB (bounded memory)."""
    if (directory / "config.json").exists():
        return
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import save_file

    from pytest_spectral.testing.synthetic import LlamaShape, attention_name, trained_like_layer

    shape = LlamaShape(
        layers=layers,
        heads=32,
        kv_heads=8,
        head_dim=128,
        hidden=4096,
        intermediate=14336,
        vocab=128256,
        mlp=full,
    )
    print(f"writing {directory} ({kind}, {layers} layers) ...", flush=True)
    generator = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]

    def add(tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if sum(t.nbytes for t in shards[-1].values()) + tensor.numel() * 2 > SHARD_BYTES:
                shards.append({})
            shards[-1][name] = tensor.to(torch.bfloat16).contiguous()
        while len(shards) > 1:  # write every full shard now; only the last stays in memory
            flush(shards.pop(0))

    written: list[tuple[str, list[str]]] = []

    def flush(shard: dict[str, torch.Tensor]) -> None:
        filename = f"part-{len(written):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        written.append((filename, list(shard)))

    def gaussian_layer(shape: LlamaShape, layer: int, generator: torch.Generator) -> dict:
        d, hidden = shape.head_dim, shape.hidden
        sizes = {
            attention_name(layer, "q"): (shape.heads * d, hidden),
            attention_name(layer, "k"): (shape.kv_heads * d, hidden),
            attention_name(layer, "v"): (shape.kv_heads * d, hidden),
            attention_name(layer, "o"): (hidden, shape.heads * d),
        }
        if shape.mlp:
            prefix = f"model.layers.{layer}.mlp"
            sizes[f"{prefix}.gate_proj.weight"] = (shape.intermediate, hidden)
            sizes[f"{prefix}.up_proj.weight"] = (shape.intermediate, hidden)
            sizes[f"{prefix}.down_proj.weight"] = (hidden, shape.intermediate)
        return {
            name: torch.randn(rows, cols, generator=generator) * cols**-0.5
            for name, (rows, cols) in sizes.items()
        }

    def embedding() -> torch.Tensor:
        rows = torch.empty(shape.vocab, shape.hidden, dtype=torch.bfloat16)
        for start in range(0, shape.vocab, 8192):  # in pieces: float32 whole would be 2 GB
            piece = torch.randn(min(8192, shape.vocab - start), shape.hidden, generator=generator)
            rows[start : start + 8192] = piece * shape.hidden**-0.5
        return rows

    if full:
        add({"model.embed_tokens.weight": embedding()})
    for layer in range(layers):
        if kind == "trained-like":
            add(trained_like_layer(shape, layer, generator))
        else:
            add(gaussian_layer(shape, layer, generator))
    if full:
        add({"model.norm.weight": torch.ones(shape.hidden), "lm_head.weight": embedding()})
    flush(shards.pop())
    total = len(written)
    weight_map: dict[str, str] = {}
    for number, (filename, names) in enumerate(written):
        final = f"model-{number + 1:05d}-of-{total:05d}.safetensors"
        (directory / filename).rename(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = shape.config()
    config["head_dim"] = shape.head_dim
    (directory / "config.json").write_text(json.dumps(config, indent=1))


@dataclass
class Row:
    """Every run of one command: wall seconds, CPU seconds, peak RSS."""

    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    rss_mb: float = 0.0

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    def spread(self) -> str:
        return f"{min(self.walls):.2f}-{max(self.walls):.2f}"


def timed(command: list[str], cwd: Path) -> tuple[float, float, dict[str, object]]:
    """Run ``command``; its wall and CPU seconds and the JSON line it printed last."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{output}")
    return wall, cpu, json.loads(lines[-1])


def measure(commands: dict[str, list[str]], cwd: Path, repeat: int) -> dict[str, Row]:
    """Run every command ``repeat`` times, alternating between them."""
    rows = {name: Row() for name in commands}
    for number in range(repeat):
        for name, command in commands.items():
            wall, cpu, out = timed(command, cwd)
            rows[name].walls.append(wall)
            rows[name].cpus.append(cpu)
            rows[name].rss_mb = max(rows[name].rss_mb, float(out["rss_mb"]))
            print(f"  run {number + 1}/{repeat} {name}: {wall:.2f} s", flush=True)
    return rows


def table(title: str, rows: dict[str, Row], reference: str, label: str) -> str:
    """A Markdown table of ``rows`` with ratios of medians to ``rows[reference]``."""
    lines = [
        f"**{title}**",
        "",
        f"| run | wall s (median) | spread | CPU s | x {label} | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[reference].wall
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row.wall:.2f} | {row.spread()} | {row.cpu:.1f} | "
            f"{row.wall / base:.2f} | {row.rss_mb:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument(
        "--attention-only",
        action="store_true",
        help="write attention weights only (2.5 GB per checkpoint instead of 16 GB)",
    )
    parser.add_argument("--dir", type=Path, default=REPO / ".bench")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kinds", default="trained-like,isotropic")
    parser.add_argument("--seed-items", type=int, default=0)
    parser.add_argument("--xdist", type=int, default=0, help="also time -n N")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads of the floor script"
    )
    parser.add_argument(
        "--single-thread-floor",
        action="store_true",
        help="also time the floor script on one thread (robust to a loaded machine, where "
        "spinning BLAS threads slow the multi-threaded floor down several times)",
    )
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="time only the cached re-run against the empty pytest run (on the first kind)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--device",
        default="cpu",
        help="also time the floor and the plugin on this device (cuda, cuda:N, mps)",
    )
    args = parser.parse_args()
    if args.cached_only and args.seed_items:
        parser.error("--seed-items compares with the floor script, which --cached-only skips")

    full = not args.attention_only
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    models = {
        kind: args.dir / f"llama3-8b-shaped-{kind}-{args.layers}l{'-full' if full else ''}"
        for kind in kinds
    }
    for kind, model in models.items():
        write_model(model, args.layers, kind, full)
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

    def floor(model: Path, device: str, threads: int = args.threads) -> list[str]:
        script = FLOOR.format(threads=threads, peak=PEAK, device=device)
        return [py, "-c", script, str(model)]

    def plugin(model: Path, device: str, *extra: str) -> list[str]:
        return [
            *base_pytest,
            f"--spectral-model={model}",
            "--spectral-thresholds=rules_a.toml",
            "--spectral-no-cache",
            f"--spectral-device={device}",
            *extra,
        ]

    load_at_start = os.getloadavg()
    results: dict[str, dict[str, Row]] = {}
    for kind, model in {} if args.cached_only else models.items():
        print(f"{kind}: warming the page cache", flush=True)
        timed(floor(model, "cpu"), work)
        commands = {
            "floor script": floor(model, "cpu"),
            "plugin": plugin(model, "cpu"),
            "plugin, in one process": plugin(model, "cpu", "--spectral-subprocess=off"),
        }
        if args.single_thread_floor:
            commands["floor script, 1 thread"] = floor(model, "cpu", threads=1)
        if args.xdist:
            parallel = plugin(model, "cpu", "-n", str(args.xdist), "--dist", "loadscope")
            commands[f"plugin -n {args.xdist}"] = parallel
        if args.device != "cpu":
            commands[f"floor script {args.device}"] = floor(model, args.device)
            commands[f"plugin {args.device}"] = plugin(model, args.device)
        results[kind] = measure(commands, work, args.repeat)

    first = models[kinds[0]]
    timed([*base_pytest, f"--spectral-model={first}", "--spectral-thresholds=rules_a.toml"], work)
    cached = [*base_pytest, f"--spectral-model={first}", "--spectral-thresholds=rules_b.toml"]
    print("cached re-run against an empty pytest run", flush=True)
    results["cache"] = measure(
        {"empty pytest": [*base_pytest, "test_empty.py"], "plugin, cached": cached},
        work,
        args.repeat,
    )

    seed_line = ""
    if args.seed_items:
        sample = [[(5 + i) % args.layers, "qkvo"[i % 4], 3] for i in range(args.seed_items)]
        seed = [py, "-c", SEED.replace("PEAK", PEAK), str(first), json.dumps(sample)]
        _, _, out = timed(seed, work)
        per_item = float(out["per_item_s"])
        seed_line = (
            f"seed article's method: {per_item:.2f} s per item over {len(sample)} items, "
            f"{per_item * items:.0f} s extrapolated to {items} items "
            f"({per_item * items / results[kinds[0]]['floor script'].wall:.0f}x the floor)"
        )

    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()
    print(
        f"\n{args.layers} layers, {items} items, {cores} CPUs, {args.repeat} runs each "
        f"(alternated), load average (1, 5, 15 min) at the start "
        f"{' '.join(f'{x:.1f}' for x in load_at_start)}, at the end "
        f"{' '.join(f'{x:.1f}' for x in load)}, "
        f"checkpoints {'with MLP, embeddings and LM head' if full else 'attention only'}"
        + (
            ", PYTHONDONTWRITEBYTECODE set (modules without a .pyc compile on every run)"
            if sys.dont_write_bytecode
            else ""
        )
        + "\n"
    )
    for kind in [kind for kind in kinds if kind in results]:
        print(table(f"{kind} checkpoint", results[kind], "floor script", "floor") + "\n")
    print(table("cached re-run (new thresholds)", results["cache"], "empty pytest", "empty") + "\n")
    if seed_line:
        print(seed_line)
    if args.json:
        figures = {
            group: {
                name: {"walls": row.walls, "cpus": row.cpus, "rss_mb": row.rss_mb}
                for name, row in rows.items()
            }
            for group, rows in results.items()
        }
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
