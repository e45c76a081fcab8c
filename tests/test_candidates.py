"""Pruning candidates: the suggested rank, its error, the break-even rank and the savings."""

from __future__ import annotations

import math

import pytest

from pytest_spectral.checkpoint import Geometry
from pytest_spectral.report import pruning_candidates

GEOMETRY = Geometry(layers=2, heads=8, kv_heads=2, head_dim=8, hidden=32)


def record(matrix: str = "q", suggest: str = "low_rank", rank: float = 2.0, head=3) -> dict:
    shape = [32, 8] if matrix == "o" else [8, 32]
    return {
        "nodeid": f"spectral::layer00::head03-{matrix}",
        "layer": 0,
        "head": head,
        "matrix": matrix,
        "shape": shape,
        "outcome": "failed",
        "status": "ok",
        "singular_values": [4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        "metrics": {"energy_rank(p=0.95)": rank},
        "broken_rules": [{"rule": "r", "suggest": suggest}],
    }


def test_rank_error_break_even_and_savings() -> None:
    (candidate,) = pruning_candidates([record()], "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.rank == 2
    # energies 16, 9, 4, 1 of 30: rank 2 keeps 25/30
    assert candidate.error == pytest.approx(math.sqrt(5 / 30))
    assert candidate.break_even == pytest.approx(8 * 32 / 40)
    assert (candidate.params_before, candidate.params_after) == (256, 80)
    assert candidate.saved == 176
    assert candidate.removal is None


def test_no_saving_at_or_above_break_even() -> None:
    (candidate,) = pruning_candidates([record(rank=7)], "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.params_after == candidate.params_before
    assert candidate.saved == 0


def test_whole_head_removal() -> None:
    candidates = pruning_candidates(
        [record("q", "remove_head"), record("k", "remove_head")], "energy_rank(p=0.95)", GEOMETRY
    )
    query, key = sorted(candidates, key=lambda c: c.record["matrix"] != "q")
    per_query_head = 2 * 8 * 32  # its Q rows and O columns
    assert query.removal == per_query_head
    # A K/V head goes only with the 4 query heads sharing it, plus its own K and V rows.
    assert key.removal == 4 * per_query_head + 2 * 8 * 32
    assert key.saved == key.removal


def test_passed_items_are_not_candidates() -> None:
    passed = {**record(), "outcome": "passed"}
    assert pruning_candidates([passed], "energy_rank(p=0.95)", GEOMETRY) == []


def test_whole_matrix_items_are_never_removed_as_heads() -> None:
    (candidate,) = pruning_candidates(
        [record("q", "remove_head", head=None)], "energy_rank(p=0.95)", GEOMETRY
    )
    assert candidate.removal is None
