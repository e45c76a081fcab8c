"""Where each head's slice lives in a stored weight: index arithmetic only, no torch.

The engine views weights through :func:`fused_grid`; failure messages, which run in processes
that may never import torch (a re-run served from the cache), locate a slice with
:func:`slice_span`. Both read the same grid, so the message names the rows the engine used.
"""

from __future__ import annotations

from pytest_spectral.checkpoints.checkpoint import Geometry, Layout


def fused_grid(matrix: str, g: Geometry, fused: str | None) -> tuple[int, int, tuple[int, int]]:
    """Rows as a [groups, per_group] grid of head blocks, and the range ``matrix`` occupies."""
    h, kv = g.heads, g.kv_heads
    if fused is None:
        return g.distinct_heads(matrix), 1, (0, 1)
    if fused == "concat":
        ranges = {"q": (0, h), "k": (h, h + kv), "v": (h + kv, h + 2 * kv)}
        return 1, h + 2 * kv, ranges[matrix]
    if fused == "interleaved":
        return h, 3, {"q": (0, 1), "k": (1, 2), "v": (2, 3)}[matrix]
    n = g.group_size  # grouped: per K/V head, its n query heads, then k, then v
    return kv, n + 2, {"q": (0, n), "k": (n, n + 1), "v": (n + 1, n + 2)}[matrix]


def slice_span(matrix: str, index: int, geometry: Geometry, layout: Layout) -> tuple[str, int, int]:
    """Where slice ``index`` of ``spectra.head_blocks`` sits in the stored weight.

    Returns ``("rows" | "columns", start, stop)``: ``head_blocks(...)[index]`` is exactly
    ``weight[start:stop]`` or ``weight[:, start:stop]``. Failure messages use it to send the
    user to the weights themselves, which in a fused or transposed tensor are not where the
    head number alone suggests.
    """
    d = geometry.head_dim
    if matrix == "o":
        block, along_rows = index, layout.conv1d
    else:
        _, per_group, (start, stop) = fused_grid(matrix, geometry, layout.fused)
        group, offset = divmod(index, stop - start)
        block, along_rows = group * per_group + start + offset, not layout.conv1d
    return ("rows" if along_rows else "columns", block * d, (block + 1) * d)
