"""Write ``examples/tiny-llama``: the demo checkpoint, with planted spectral problems.

A 4-layer Llama-layout model (hidden 256, 8 query heads, 2 K/V heads, head_dim 32, bf16,
two shards), about 3 MB. Every head slice gets a smooth power-law spectrum, like a trained
head; a few are planted so that ``example_thresholds.toml`` has something to find:

* layer 1, query head 2, Q: collapsed to rank 2 (plus a faint noise floor);
* layer 2, K/V head 1, K: a steep exponential decay (query heads 4-7 share it);
* layer 3, query head 5, O: rank-deficient, its last singular values near bf16's floor;
* layer 0, K/V head 1, V: mildly concentrated, which only a ``warn`` rule reports.

``python examples/make_tiny_llama.py`` (``--help`` for the options). Deterministic: the
same bytes every time. It writes only its own four files: into a new or empty directory, or
over an earlier output of its own; a directory holding anything else is refused, untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pytest_spectral.testing.synthetic import (
    LlamaShape,
    attention_name,
    random_llama_weights,
    write_checkpoint,
)

SHAPE = LlamaShape(
    layers=4, heads=8, kv_heads=2, head_dim=32, hidden=256, intermediate=256, vocab=128
)
DEFAULT_OUTPUT = Path(__file__).parent / "tiny-llama"
SHARDS = 2
#: the files the script writes, and the only ones it replaces
OWN_FILES = frozenset(
    {
        "config.json",
        "model.safetensors.index.json",
        *(f"model-{i:05d}-of-{SHARDS:05d}.safetensors" for i in range(1, SHARDS + 1)),
    }
)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write the demo checkpoint: a 4-layer Llama-layout model (bf16, two "
        "shards, about 3 MB) with planted spectral problems for example_thresholds.toml.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help="directory to write, created if needed; an existing one must be empty or an "
        f"earlier output of this script, whose files are replaced (default: {DEFAULT_OUTPUT})",
    )
    arguments = parser.parse_args(argv)
    problem = output_problem(arguments.output)
    if problem is not None:
        parser.error(problem)
    return arguments


def output_problem(output: Path) -> str | None:
    """Why ``output`` cannot be written without touching files this script did not write,
    or ``None``: it must be absent, an empty directory, or one holding only :data:`OWN_FILES`
    as regular files (a symlink there would be written through)."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        return f"--output {output}: exists and is not a directory; give a directory"
    if not output.exists():
        return None
    others = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in output.iterdir()
        if p.name not in OWN_FILES or p.is_symlink() or not p.is_file()
    )
    if not others:
        return None
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return (
        f"--output {output}: holds {shown}, which this script did not write; it writes only "
        "into a new or empty directory, or over its own earlier output: choose another"
    )


def block(generator: torch.Generator, rows: int, cols: int, spectrum: torch.Tensor) -> torch.Tensor:
    """A rows x cols matrix with exactly the given singular values (random singular vectors)."""
    rank = spectrum.numel()
    left, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64))
    return (left * spectrum) @ right.T


def spectrum_for(
    generator: torch.Generator, layer: int, matrix: str, head: int, d: int
) -> torch.Tensor:
    index = torch.arange(1, d + 1, dtype=torch.float64)
    decay = 0.3 + 0.15 * float(torch.rand((), generator=generator))
    healthy = 0.6 * index**-decay
    if (layer, matrix, head) == (1, "q", 2):
        return torch.cat([torch.tensor([2.0, 1.2]), torch.full((d - 2,), 0.004)]).double()
    if (layer, matrix, head) == (2, "k", 1):
        return 1.5 * torch.exp(-(index - 1) / 2.0)
    if (layer, matrix, head) == (3, "o", 5):
        return torch.where(index <= d - 4, healthy, torch.full_like(healthy, 1e-5))
    if (layer, matrix, head) == (0, "v", 1):
        return 0.6 * index**-0.9
    return healthy


def main(argv: list[str] | None = None) -> None:
    output = parse_arguments(argv).output
    generator = torch.Generator().manual_seed(20240611)
    tensors = random_llama_weights(SHAPE, seed=7)
    d, hidden = SHAPE.head_dim, SHAPE.hidden
    for layer in range(SHAPE.layers):
        for matrix in ("q", "k", "v", "o"):
            heads = SHAPE.kv_heads if matrix in ("k", "v") else SHAPE.heads
            blocks = [
                block(generator, d, hidden, spectrum_for(generator, layer, matrix, head, d))
                for head in range(heads)
            ]
            if matrix == "o":  # an O head is a column block
                weight = torch.cat([b.T for b in blocks], dim=1)
            else:
                weight = torch.cat(blocks, dim=0)
            tensors[attention_name(layer, matrix)] = weight.float()
    try:
        write_checkpoint(output, tensors, SHAPE.config(), dtype=torch.bfloat16, shards=SHARDS)
        readable_by_all(output)
    except OSError as exc:
        sys.exit(f"make_tiny_llama.py: cannot write {output}: {exc.strerror or exc}")
    size = sum((output / name).stat().st_size for name in OWN_FILES)
    print(f"wrote {output} ({size / 1e6:.1f} MB)")


def readable_by_all(directory: Path) -> None:
    """Give the files the permissions the umask gives any new file (safetensors writes its
    files 0600, which would keep other users from running the demo)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in OWN_FILES:
        (directory / name).chmod(0o666 & ~umask)


if __name__ == "__main__":
    main()
