"""Where each head's slice lives in a stored weight: index arithmetic only, no torch.

The engine views weights through :func:`fused_grid`; failure messages, which run in processes
that may never import torch (a re-run served from the cache), locate a slice with
:func:`slice_span`. Both read the same grid, so the message names the rows the engine used.
"""

from __future__ import annotations

from pytest_spectral.checkpoints.checkpoint import Geometry, Layout


def fused_grid(matrix: str, g: Geometry, fused: str | None) -> tuple[int, int, tuple[int, int]]:
    """The stored rows as a ``[groups, period]`` grid, and the rows ``[start, stop)`` of each
    group that ``matrix``'s slices occupy, ``g.head_rows(matrix)`` rows per slice."""
    d = g.head_rows(matrix)
    if fused == "latent" and matrix in ("k", "v"):  # kv_b_proj: per head, K_nope then V
        nope, v = g.head_rows("k"), g.head_rows("v")
        return g.heads, nope + v, {"k": (0, nope), "v": (nope, nope + v)}[matrix]
    if fused in (None, "latent"):
        return g.distinct_heads(matrix), d, (0, d)
    h, kv = g.heads, g.kv_heads
    if fused == "concat":
        ranges = {"q": (0, h), "k": (h, h + kv), "v": (h + kv, h + 2 * kv)}
        groups, per_group, (start, stop) = 1, h + 2 * kv, ranges[matrix]
    elif fused == "interleaved":
        groups, per_group, (start, stop) = h, 3, {"q": (0, 1), "k": (1, 2), "v": (2, 3)}[matrix]
    else:
        n = g.group_size  # grouped: per K/V head, its n query heads, then k, then v
        ranges = {"q": (0, n), "k": (n, n + 1), "v": (n + 1, n + 2)}
        groups, per_group, (start, stop) = kv, n + 2, ranges[matrix]
    return groups, per_group * d, (start * d, stop * d)


def slice_span(matrix: str, index: int, geometry: Geometry, layout: Layout) -> tuple[str, int, int]:
    """Where slice ``index`` of ``spectra.head_blocks`` sits in the stored weight.

    Returns ``("rows" | "columns", start, stop)``: ``head_blocks(...)[index]`` is exactly
    ``weight[start:stop]`` or ``weight[:, start:stop]``. Failure messages use it to send the
    user to the weights themselves, which in a fused or transposed tensor are not where the
    head number alone suggests.
    """
    d = geometry.head_rows(matrix)
    if matrix == "o":
        first, along_rows = index * d, layout.conv1d
    else:
        _, period, (start, stop) = fused_grid(matrix, geometry, layout.fused)
        group, offset = divmod(index, (stop - start) // d)
        first, along_rows = group * period + start + offset * d, not layout.conv1d
    return ("rows" if along_rows else "columns", first, first + d)


def whole_rows(matrix: str, geometry: Geometry) -> tuple[int, int] | None:
    """The rows of its stored tensor a whole-matrix item is, where it is not the whole tensor:
    the key/value down-projection and the shared rope key of multi-head latent attention,
    which transformers stores together in ``kv_a_proj_with_mqa``."""
    latent = geometry.latent
    if latent is None or matrix not in ("kv_a", "k_rope"):
        return None
    start, stop, _ = latent.down_rows(matrix)
    return start, stop
