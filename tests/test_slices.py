"""Where each head's slice sits in a stored weight, by hand, for every fused layout.

4 query heads share 2 K/V heads (group size 2), head_dim 8, hidden 32. Row blocks of 8 are
numbered from 0. Hand layouts (README, Supported architectures):

* separate q/k/v (Llama): head h is block h of its own tensor;
* concat (Phi-3 ``qkv_proj``): the 4 Q blocks, then the 2 K blocks, then the 2 V blocks;
* interleaved (GPT-NeoX; as many K/V heads as query heads): q, k, v of head 0, then of head 1...;
* grouped (Falcon-40B): per K/V head, its 2 query heads, then its k, then its v;
* O is block h of the columns (rows when stored transposed, GPT-2's Conv1D).

``transformers`` forward passes check the same layouts end to end in test_architectures.py;
these hand values pin each index of the arithmetic without building a model.
"""

from __future__ import annotations

import pytest
import torch

from pytest_spectral.checkpoints.checkpoint import Geometry, Layout
from pytest_spectral.checkpoints.families import Latent
from pytest_spectral.checkpoints.slices import slice_span
from pytest_spectral.compute.spectra import head_blocks, whole_matrix

GQA = Geometry(layers=1, heads=4, kv_heads=2, head_dim=8, hidden=32)
MHA = Geometry(layers=1, heads=4, kv_heads=4, head_dim=8, hidden=32)


def layout(fused: str | None, conv1d: bool = False) -> Layout:
    return Layout("test", fused, conv1d)


#: (geometry, fused, matrix, slice index) -> first row of the slice's block of 8
CASES = [
    (GQA, None, "q", 3, 24),
    (GQA, None, "k", 1, 8),
    (GQA, None, "v", 0, 0),
    (GQA, "concat", "q", 3, 24),
    (GQA, "concat", "k", 0, 32),  # after 4 Q blocks
    (GQA, "concat", "k", 1, 40),
    (GQA, "concat", "v", 0, 48),  # after 4 Q and 2 K blocks
    (GQA, "concat", "v", 1, 56),
    (MHA, "interleaved", "q", 0, 0),
    (MHA, "interleaved", "q", 2, 48),  # head 2 starts at block 3 * 2
    (MHA, "interleaved", "k", 2, 56),
    (MHA, "interleaved", "v", 2, 64),
    (MHA, "interleaved", "v", 3, 88),
    (GQA, "grouped", "q", 0, 0),
    (GQA, "grouped", "q", 1, 8),
    (GQA, "grouped", "q", 2, 32),  # K/V head 1's group starts at block 4
    (GQA, "grouped", "q", 3, 40),
    (GQA, "grouped", "k", 0, 16),
    (GQA, "grouped", "k", 1, 48),
    (GQA, "grouped", "v", 0, 24),
    (GQA, "grouped", "v", 1, 56),
]


def stored_rows(geometry: Geometry, fused: str | None, matrix: str) -> int:
    if fused is None:
        return geometry.distinct_heads(matrix) * geometry.head_dim
    return (geometry.heads + 2 * geometry.kv_heads) * geometry.head_dim


def numbered(rows: int, cols: int) -> torch.Tensor:
    """A weight whose every element is its own flat position."""
    return torch.arange(rows * cols, dtype=torch.float64).view(rows, cols)


@pytest.mark.parametrize(("geometry", "fused", "matrix", "index", "start"), CASES)
def test_slice_span_by_hand(geometry, fused, matrix, index, start) -> None:
    assert slice_span(matrix, index, geometry, layout(fused)) == ("rows", start, start + 8)
    # whole row numbers (a failure message prints rows 32:40, not 32.0:40.0)
    _, first, stop = slice_span(matrix, index, geometry, layout(fused))
    assert (type(first), type(stop)) == (int, int)
    # stored transposed ([in, out], Conv1D): the same blocks, as columns
    assert slice_span(matrix, index, geometry, layout(fused, conv1d=True)) == (
        "columns",
        start,
        start + 8,
    )


@pytest.mark.parametrize(("geometry", "fused", "matrix", "index", "start"), CASES)
def test_head_blocks_take_those_rows(geometry, fused, matrix, index, start) -> None:
    weight = numbered(stored_rows(geometry, fused, matrix), 32)
    blocks = head_blocks(weight, matrix, geometry, layout(fused))
    assert blocks.shape == (geometry.distinct_heads(matrix), 8, 32)
    assert torch.equal(blocks[index], weight[start : start + 8])
    transposed = head_blocks(weight.T.contiguous(), matrix, geometry, layout(fused, conv1d=True))
    assert transposed.shape == (geometry.distinct_heads(matrix), 32, 8)
    assert torch.equal(transposed[index], weight[start : start + 8].T)


#: heads * head_dim (48) other than hidden (32): O is not square
WIDE_HEADS = Geometry(layers=1, heads=4, kv_heads=2, head_dim=12, hidden=32)


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("geometry", [GQA, WIDE_HEADS], ids=["square", "wide-heads"])
def test_o_slices_are_column_blocks(index: int, conv1d: bool, geometry: Geometry) -> None:
    d = geometry.head_dim
    weight = numbered(32, 4 * d)  # [hidden, heads * head_dim]
    stored = weight.T.contiguous() if conv1d else weight
    axis = "rows" if conv1d else "columns"
    span = slice_span("o", index, geometry, layout(None, conv1d))
    assert span == (axis, d * index, d * index + d)
    block = head_blocks(stored, "o", geometry, layout(None, conv1d))[index]
    expected = weight[:, d * index : d * index + d]
    assert torch.equal(block, expected.T if conv1d else expected)


#: fused layout -> matrix -> its row blocks of the fused tensor, in head order
FUSED_BLOCKS = {
    "concat": {"q": [0, 1, 2, 3], "k": [4, 5], "v": [6, 7]},
    "grouped": {"q": [0, 1, 4, 5], "k": [2, 6], "v": [3, 7]},
}


@pytest.mark.parametrize("fused", list(FUSED_BLOCKS))
@pytest.mark.parametrize("conv1d", [False, True])
def test_whole_matrix_of_a_fused_tensor_is_that_matrix_share(fused: str, conv1d: bool) -> None:
    weight = numbered(64, 32)
    stored = weight.T.contiguous() if conv1d else weight
    for matrix, blocks in FUSED_BLOCKS[fused].items():
        whole = whole_matrix(stored, matrix, GQA, layout(fused, conv1d))
        expected = torch.cat([weight[8 * b : 8 * b + 8] for b in blocks])
        assert torch.equal(whole, expected.T if conv1d else expected), matrix
    assert whole_matrix(stored, "o", GQA, layout(fused, conv1d)) is stored


def test_unfused_whole_matrix_is_the_stored_weight() -> None:
    weight = numbered(16, 32)
    assert whole_matrix(weight, "k", GQA, layout(None)) is weight


#: multi-head latent attention (DeepSeek): 3 heads, K_nope 2 rows and V 3 rows per head in
#: kv_b_proj (each head's K_nope rows, then its V rows), Q of nope 2 + rope 1 rows per head in
#: q_b_proj; kv_a_proj_with_mqa holds the latent's 4 rows, then the shared rope key's 1 row
LATENT = Latent(q_lora_rank=6, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=1, v_head_dim=3)
MLA = Geometry(layers=1, heads=3, kv_heads=3, head_dim=3, hidden=16, latent=LATENT)


@pytest.mark.parametrize(
    ("matrix", "head", "rows"),
    [
        ("q", 0, (0, 3)),
        ("q", 2, (6, 9)),
        ("k", 0, (0, 2)),  # head 0's block of kv_b_proj is rows 0-4: K_nope 0-1, V 2-4
        ("v", 0, (2, 5)),
        ("k", 1, (5, 7)),
        ("v", 1, (7, 10)),
        ("k", 2, (10, 12)),
        ("v", 2, (12, 15)),
    ],
)
def test_latent_head_slices_by_hand(matrix: str, head: int, rows: tuple[int, int]) -> None:
    stored = numbered(15 if matrix in "kv" else 9, 4 if matrix in "kv" else 6)
    assert slice_span(matrix, head, MLA, layout("latent")) == ("rows", *rows)
    block = head_blocks(stored, matrix, MLA, layout("latent"))[head]
    assert torch.equal(block, stored[rows[0] : rows[1]])


@pytest.mark.parametrize(("matrix", "rows"), [("kv_a", (0, 4)), ("k_rope", (4, 5))])
def test_latent_down_projection_rows_by_hand(matrix: str, rows: tuple[int, int]) -> None:
    stored = numbered(5, 16)  # kv_a_proj_with_mqa: kv_lora_rank + qk_rope_head_dim rows
    whole = whole_matrix(stored, matrix, MLA, layout("latent"))
    assert torch.equal(whole, stored[rows[0] : rows[1]])


@pytest.mark.parametrize("matrix", ["q_a", "o", "gate"])
def test_other_whole_matrices_of_a_latent_model_are_their_stored_weight(matrix: str) -> None:
    stored = numbered(6, 16)  # q_a_proj: q_lora_rank rows, all of them the item
    assert torch.equal(whole_matrix(stored, matrix, MLA, layout("latent")), stored)
