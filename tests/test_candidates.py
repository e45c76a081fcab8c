"""Pruning candidates: the suggested rank, its error, the break-even rank and the savings."""

from __future__ import annotations

import math

import pytest

from pytest_spectral.checkpoints.checkpoint import Geometry
from pytest_spectral.checkpoints.families import Latent
from pytest_spectral.judging.candidates import (
    candidate_record,
    pruning_candidates,
    regression_record,
    regressions,
    total_saving,
)
from pytest_spectral.reporting.summary import render_summary

GEOMETRY = Geometry(layers=2, heads=8, kv_heads=2, head_dim=8, hidden=32)


def record(
    matrix: str = "q",
    suggest: str = "low_rank",
    rank: float = 2.0,
    head: int | None = 3,
    rules: tuple[str, ...] = ("r",),
) -> dict:
    """An item record as the plugin writes it (GEOMETRY: query heads 4h..4h+3 share K/V h)."""
    shape = [32, 8] if matrix == "o" else [8, 32]
    shared = matrix in ("k", "v") and head is not None
    return {
        "nodeid": f"spectral::layer00::head{head:02d}-{matrix}" if head is not None else matrix,
        "layer": 0,
        "scope": "head" if head is not None else "matrix",
        "head": head,
        "kv_head": head // 4 if shared else None,
        "matrix": matrix,
        "shape": shape,
        "outcome": "failed",
        "status": "ok",
        "singular_values": [4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        "metrics": {"energy_rank(p=0.95)": rank},
        "broken_rules": [
            {
                "rule": name,
                "metric": "stable_rank",
                "value": 0.5,
                "min": 1.0,
                "max": None,
                "min_change": None,
                "max_change": None,
                "baseline": None,
                "severity": "fail",
                "bound": "min",
                "suggest": suggest,
            }
            for name in rules
        ],
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


@pytest.mark.parametrize(
    ("rank", "saved", "fraction"),
    [
        (1, 256 - 40, 216 / 256),
        (2, 256 - 80, 0.6875),
        (6, 256 - 240, 0.0625),  # just below the break-even rank 6.4
        (7, 0, 0.0),  # 7 * 40 = 280 > 256: nothing saved
    ],
)
def test_saving_fraction_is_the_share_saved(rank, saved, fraction) -> None:
    """A rank-r factorisation of 8 x 32 keeps r (8 + 32) of 256 parameters."""
    (candidate,) = pruning_candidates([record(rank=rank)], "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.saved == saved
    assert candidate.saving_fraction == fraction


def test_summary_table_prints_the_saved_parameters_and_their_share() -> None:
    records = [record(rank=2, head=1), record(rank=7, head=2), record("q", "remove_head", 6, 3)]
    candidates = pruning_candidates(records, "energy_rank(p=0.95)", GEOMETRY)
    text = render_summary(
        records, candidates, [], total_saved=12345, energy=0.95, width=160, color=False
    )
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()]
    rows = {row[0]: row[1:] for row in cells if row and row[0].startswith("L0")}
    # 176 / 256 = 68.75% saved (the kept share would be 31%); error sqrt(1 - 25/30) = 0.41
    # each broken rule reads "name: value < bound" (stable_rank 0.5 below min 1)
    assert rows["L0 H1 q"] == ["r: 0.5 < 1", "2 (0.41)", "6", "176 (69%)"]
    assert rows["L0 H2 q"] == ["r: 0.5 < 1", "7 (0.00)", "6", "none"]  # 7 * 40 > 256
    assert rows["L0 H3 q"] == ["r: 0.5 < 1", "6 (0.00)", "6", "16 (6%)"]
    assert "remove head: 512" in text
    assert "3 candidate slices; acting on every suggestion would save at most 12,345 " in text
    assert "rank@95%" in text


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
    (value,) = pruning_candidates([record("v", "remove_head")], "energy_rank(p=0.95)", GEOMETRY)
    assert value.removal == key.removal


def test_head_removal_under_latent_attention_counts_each_slices_own_shape() -> None:
    """Multi-head latent attention: Q 12 x 24 (nope 8 + rope 4, on a 24-rank query latent),
    K_nope 8 x 16 and V 10 x 16 (on the 16-rank key/value latent), O 64 x 10; each query head
    has its own K and V."""
    latent = Latent(24, 16, 8, 4, 10)
    geometry = Geometry(layers=2, heads=4, kv_heads=4, head_dim=12, hidden=64, latent=latent)
    (query,) = pruning_candidates([record("q", "remove_head")], "energy_rank(p=0.95)", geometry)
    assert query.removal == 12 * 24 + 64 * 10
    own_kv = {**record("k", "remove_head"), "kv_head": 3}  # K/V head h is query head h
    (key,) = pruning_candidates([own_kv], "energy_rank(p=0.95)", geometry)
    assert key.removal == 12 * 24 + 64 * 10 + 8 * 16 + 10 * 16
    assert total_saving([query, key], geometry) == key.removal  # query head 3 counted once


def test_passed_items_are_not_candidates() -> None:
    passed = {**record(), "outcome": "passed"}
    assert pruning_candidates([passed], "energy_rank(p=0.95)", GEOMETRY) == []


def test_whole_matrix_items_are_never_removed_as_heads() -> None:
    (candidate,) = pruning_candidates(
        [record("q", "remove_head", head=None)], "energy_rank(p=0.95)", GEOMETRY
    )
    assert candidate.removal is None


def test_items_of_a_shared_kv_slice_are_one_candidate() -> None:
    items = [record("k", head=h) for h in (4, 5, 6, 7)] + [record("q", head=5)]
    key, query = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    assert key.heads == (4, 5, 6, 7)
    assert key.nodeids == tuple(f"spectral::layer00::head0{h}-k" for h in (4, 5, 6, 7))
    assert key.label == "L0 H4-7 k"
    assert key.saved == 176  # priced once, not four times
    assert (query.heads, query.label) == ((5,), "L0 H5 q")


def test_shared_slice_items_with_different_verdicts_stay_apart() -> None:
    """A rule limited to some query heads breaks only their items of the shared slice."""
    items = [record("v", head=4, rules=("r", "only-head-4")), record("v", head=5)]
    candidates = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    assert sorted(c.heads for c in candidates) == [(4,), (5,)]


def test_query_heads_and_other_kv_groups_never_merge() -> None:
    items = [record("q", head=h) for h in (0, 1)] + [record("k", head=h) for h in (3, 4)]
    candidates = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    assert sorted(c.label for c in candidates) == ["L0 H0 q", "L0 H1 q", "L0 H3 k", "L0 H4 k"]


def test_whole_matrix_label_and_json_entry() -> None:
    (candidate,) = pruning_candidates([record("q", head=None)], "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.label == "L0 q"
    entry = candidate_record(candidate)
    assert entry["heads"] == []
    assert (entry["suggested_rank"], entry["params"], entry["params_saved"]) == (2, 256, 176)
    assert entry["break_even_rank"] == pytest.approx(6.4)
    assert entry["rules"] == ["r"]


def test_candidates_are_ordered_by_saving_then_node_id() -> None:
    items = [
        record("q", head=2, rank=6),  # saves 16
        record("q", head=1, rank=2),  # saves 176
        record("o", head=0, rank=2),  # saves 176 too: "head00-o" < "head01-q"
        record("q", "remove_head", 7, head=3),  # removal: 512
    ]
    candidates = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    assert [c.label for c in candidates] == ["L0 H3 q", "L0 H0 o", "L0 H1 q", "L0 H2 q"]
    assert [c.saved for c in candidates] == [512, 176, 176, 16]


def test_a_shared_slice_is_named_after_its_lowest_query_head_whatever_the_order() -> None:
    items = [record("v", head=h, rank=r) for h, r in ((6, 3), (4, 2), (5, 1))]
    (candidate,) = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.record["head"] == 4
    assert candidate.rank == 2  # the record of query head 4
    assert candidate.nodeids == tuple(f"spectral::layer00::head0{h}-v" for h in (4, 5, 6))


def test_truncation_error_of_a_small_slice() -> None:
    """Energies 0.16, 0.09, 0.04, 0.01: a total below 1 is still an energy."""
    small = {**record(rank=2), "singular_values": [0.4, 0.3, 0.2, 0.1]}
    (candidate,) = pruning_candidates([small], "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.error == pytest.approx(math.sqrt(0.05 / 0.3), rel=1e-12)


def test_two_adjacent_heads_are_a_range() -> None:
    items = [record("k", head=h) for h in (4, 5)]
    (candidate,) = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.label == "L0 H4-5 k"


def test_shared_slice_with_scattered_heads_is_labelled_by_list() -> None:
    items = [record("v", head=h, rules=("r",)) for h in (4, 6)]
    (candidate,) = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.heads == (4, 6)
    assert candidate.label == "L0 H4,6 v"


@pytest.mark.parametrize("rank", [math.nan, math.inf, None, "nan"])
def test_undefined_rank_suggests_nothing(rank) -> None:
    """A zero slice's energy rank is nan (and "nan" once read back from JSON)."""
    item = record(rank=2)
    item["metrics"] = {"energy_rank(p=0.95)": rank} if rank is not None else {}
    (candidate,) = pruning_candidates([item], "energy_rank(p=0.95)", GEOMETRY)
    assert (candidate.rank, candidate.error) == (None, None)
    assert (candidate.params_after, candidate.saved, candidate.saving_fraction) == (256, 0, 0.0)


def test_a_slice_of_tiny_weights_is_priced_like_any_other() -> None:
    """Weights of 1e-170 (squares below float64's range) have a finite energy rank (the
    metrics scale first), so the candidate is priced by it: rank 2 of 8 x 32 saves 176, and
    its truncation error is sqrt(1 - (16 + 9) / 30) as for the same slice at 1. Weights of
    1e170 (squares above float64's range) have that error too."""
    tiny = {**record(rank=2), "singular_values": [v * 1e-170 for v in (4.0, 3.0, 2.0, 1.0)]}
    (candidate,) = pruning_candidates([tiny], "energy_rank(p=0.95)", GEOMETRY)
    assert (candidate.rank, candidate.saved) == (2, 176)
    assert candidate.error == pytest.approx(math.sqrt(5 / 30), rel=1e-12)
    huge = {**tiny, "singular_values": [v * 1e170 for v in (4.0, 3.0, 2.0, 1.0)]}
    (candidate,) = pruning_candidates([huge], "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.error == pytest.approx(math.sqrt(5 / 30), rel=1e-12)
    group = [{**circuit(h, 2), "singular_values": tiny["singular_values"]} for h in (4, 5, 6, 7)]
    (row,) = pruning_candidates(group, "energy_rank(p=0.95)", GEOMETRY)
    assert (row.label, row.rank, row.saved) == ("L0 H4-7 qk", 2, 5 * 6 * 32)
    assert row.error == pytest.approx(math.sqrt(5 / 30), rel=1e-12)


def test_zero_and_non_finite_slices_are_regressions_not_candidates() -> None:
    """Their spectra price nothing: an all-zero slice or one with NaN weights is damage."""
    zero = {**record(rank=1), "singular_values": [0.0] * 8, "status": "zero_matrix"}
    broken = {**record(rank=1, head=2), "singular_values": ["nan"] * 8, "status": "nonfinite"}
    assert pruning_candidates([zero, broken], "energy_rank(p=0.95)", GEOMETRY) == []
    found = regressions([zero, broken])
    assert [(g.label, g.record["status"]) for g in found] == [
        ("L0 H2 q", "nonfinite"),
        ("L0 H3 q", "zero_matrix"),
    ]


def test_a_slice_breaking_rules_of_both_kinds_is_in_both_lists_with_its_own_rules() -> None:
    """A warned V slice of the ``cross`` stack, shared by query heads 4 and 5, broke a rule
    suggesting pruning and one suggesting none; a Q slice broke only the first kind."""
    (pruning,) = record()["broken_rules"]
    broken = [{**pruning, "rule": "collapsed"}, {**pruning, "rule": "drift", "suggest": "none"}]
    shared = [
        {
            **record("v", head=h),
            "stack": "cross",
            "nodeid": f"spectral::cross::layer00::head0{h}-v",
            "outcome": "warned",
            "broken_rules": broken,
        }
        for h in (4, 5)
    ]
    items = [*shared, record("q", head=0)]
    (regression,) = regressions(items)
    assert regression_record(regression) == {
        "nodeids": ["spectral::cross::layer00::head04-v", "spectral::cross::layer00::head05-v"],
        "stack": "cross",
        "layer": 0,
        "matrix": "v",
        "heads": [4, 5],
        "kv_head": 1,
        "shape": [8, 32],
        "outcome": "warned",
        "status": "ok",
        "rules": ["drift"],
    }
    candidates = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    assert [(c.label, [b["rule"] for b in c.rules]) for c in candidates] == [
        ("cross L0 H4-5 v", ["collapsed"]),  # both save 176: by node id, "spectral::cross::"
        ("L0 H0 q", ["r"]),  # before "spectral::layer00::"
    ]


def test_failed_regressions_come_before_warned_ones() -> None:
    """Whatever their node ids: what fails the run is read first."""
    drift = [{**b, "suggest": "none"} for b in record()["broken_rules"]]
    warned = {**record(head=0), "outcome": "warned", "broken_rules": drift}
    failed = {**record(head=5), "broken_rules": drift}
    assert [g.label for g in regressions([warned, failed])] == ["L0 H5 q", "L0 H0 q"]


def test_each_query_heads_circuit_is_its_own_regression() -> None:
    """A circuit item is one query head's product, even though it records its K/V head: the
    items of a group never merge into one regression as a shared K or V slice's do."""
    drift = [{**b, "suggest": "none"} for b in record()["broken_rules"]]
    items = [{**circuit(h, 2), "broken_rules": drift} for h in (4, 5)]
    assert [g.label for g in regressions(items)] == ["L0 H4 qk", "L0 H5 qk"]


@pytest.mark.parametrize(("rank", "error"), [(1, math.sqrt(14 / 30)), (3, math.sqrt(1 / 30))])
def test_truncation_error_is_eckart_young(rank: int, error: float) -> None:
    """Energies 16, 9, 4, 1 of 30: rank r leaves the energy below it."""
    (candidate,) = pruning_candidates([record(rank=rank)], "energy_rank(p=0.95)", GEOMETRY)
    assert candidate.error == pytest.approx(error, rel=1e-12)


def test_json_entry_of_a_shared_slice_with_removal() -> None:
    items = [record("k", "remove_head", head=h, rules=("r", "s")) for h in (4, 5)]
    (candidate,) = pruning_candidates(items, "energy_rank(p=0.95)", GEOMETRY)
    per_query_head = 2 * 8 * 32
    assert candidate_record(candidate) == {
        "nodeids": ["spectral::layer00::head04-k", "spectral::layer00::head05-k"],
        "stack": None,  # a model of one stack
        "layer": 0,
        "matrix": "k",
        "heads": [4, 5],
        "kv_head": 1,
        "shape": [8, 32],
        "outcome": "failed",
        "rules": ["r", "s"],
        "suggested_rank": 2,
        "relative_error": pytest.approx(math.sqrt(5 / 30)),
        "break_even_rank": pytest.approx(6.4),
        "params": 256,
        "params_after_factorisation": 80,
        "params_saved": 4 * per_query_head + 2 * 8 * 32,
        "params_saved_by_removal": 4 * per_query_head + 2 * 8 * 32,
        "needs_heads": None,  # only an unpriced circuit needs other heads
    }


def test_a_stacks_layer_is_its_own_place() -> None:
    """An encoder-decoder model's ``cross`` layer 0 is not the decoder's layer 0: its slices
    never merge with the other's, are labelled and reported with their stack, and a head
    removed in one stack leaves the other's alone."""
    cross = [
        {**item, "stack": "cross", "nodeid": item["nodeid"].replace("::", "::cross::", 1)}
        for item in (record("k", "remove_head", head=h) for h in (4, 5))
    ]
    plain = [record("k", "remove_head", head=h) for h in (4, 5)]
    candidates = pruning_candidates([*cross, *plain], "energy_rank(p=0.95)", GEOMETRY)
    assert sorted(c.label for c in candidates) == ["L0 H4-5 k", "cross L0 H4-5 k"]
    entries = {candidate_record(c)["stack"]: candidate_record(c) for c in candidates}
    assert entries["cross"]["nodeids"] == [f"spectral::cross::layer00::head0{h}-k" for h in (4, 5)]
    # each stack's K/V head 1 goes with its 4 query heads: twice what one removal frees
    assert total_saving(candidates, GEOMETRY) == 2 * (4 * 2 * 256 + 2 * 256)
    (drift,) = regressions(
        [{**cross[0], "broken_rules": [{**cross[0]["broken_rules"][0], "suggest": "none"}]}]
    )
    assert drift.label == "cross L0 H4 k"
    assert regression_record(drift)["stack"] == "cross"


def test_removal_needs_the_geometry() -> None:
    (candidate,) = pruning_candidates([record("q", "remove_head")], "energy_rank(p=0.95)")
    assert candidate.removal is None
    assert candidate.saved == 176


def test_warned_and_failed_items_of_one_slice_stay_apart() -> None:
    warned = {**record("k", head=4), "outcome": "warned"}
    failed = record("k", head=5)
    candidates = pruning_candidates([warned, failed], "energy_rank(p=0.95)", GEOMETRY)
    assert sorted(c.heads for c in candidates) == [(4,), (5,)]


class TestTotalSaving:
    """What acting on every suggestion frees, each weight once (GEOMETRY: 8 x 32 slices)."""

    SLICE = 8 * 32

    def total(self, *records: dict) -> int:
        return total_saving(pruning_candidates(records, "energy_rank(p=0.95)", GEOMETRY), GEOMETRY)

    def test_factorisations_add_up(self) -> None:
        assert self.total(record("q", head=1), record("o", head=2)) == 176 + 176

    def test_a_head_removed_through_q_and_o_counts_once(self) -> None:
        both = self.total(record("q", "remove_head", head=1), record("o", "remove_head", head=1))
        assert both == 2 * self.SLICE  # its Q rows and O columns

    def test_removing_a_kv_head_supersedes_its_groups_other_suggestions(self) -> None:
        total = self.total(
            record("k", "remove_head", head=4),  # K/V head 1: query heads 4-7
            record("q", head=5),  # factorising a Q slice that goes anyway
            record("q", head=0),  # another group: still counts
        )
        assert total == 4 * 2 * self.SLICE + 2 * self.SLICE + 176

    def test_removing_a_kv_head_takes_its_group_once(self) -> None:
        total = self.total(
            record("v", "remove_head", head=4),  # K/V head 1 via its v slice
            record("k", "remove_head", head=5),  # ... and via its k slice
            record("q", "remove_head", head=6),  # a query head of that group
            record("o", head=7),  # factorising an O slice of that group
        )
        assert total == 4 * 2 * self.SLICE + 2 * self.SLICE  # 4 query heads, K and V rows

    def test_removed_query_head_supersedes_its_factorisations(self) -> None:
        total = self.total(
            record("q", "remove_head", head=1), record("o", head=1), record("o", head=2)
        )
        assert total == 2 * self.SLICE + 176

    def test_factorised_kv_slice_of_a_kept_group_counts(self) -> None:
        total = self.total(record("q", "remove_head", head=0), record("k", head=1))
        assert total == 2 * self.SLICE + 176  # K/V head 0 stays: its k slice is factorised

    def test_removing_a_kv_head_through_its_v_slice(self) -> None:
        assert self.total(record("v", "remove_head", head=4)) == 4 * 2 * self.SLICE + 2 * self.SLICE

    @pytest.mark.parametrize("matrix", ["k", "v"])
    def test_a_kv_slice_stays_while_its_kv_head_does(self, matrix: str) -> None:
        """Removing query heads one by one leaves their K/V head, and its slices, in place."""
        total = self.total(record("q", "remove_head", head=4), record(matrix, head=4))
        assert total == 2 * self.SLICE + 176

    def test_removals_count_in_any_order(self) -> None:
        """A whole MLP matrix saving more than a head removal is listed first."""
        up = {**record("q", head=None), "matrix": "up", "shape": [96, 32]}  # saves 3072 - 256
        candidates = pruning_candidates(
            [up, record("q", "remove_head", head=1)], "energy_rank(p=0.95)", GEOMETRY
        )
        assert [c.label for c in candidates] == ["L0 up", "L0 H1 q"]
        assert total_saving(candidates, GEOMETRY) == (96 * 32 - 2 * 128) + 2 * self.SLICE

    def test_nothing_saved(self) -> None:
        assert self.total(record(rank=7)) == 0
        assert self.total() == 0

    def test_whole_matrix_counts_only_without_head_candidates(self) -> None:
        whole_q, whole_up = record("q", head=None), {**record("q", head=None), "matrix": "up"}
        assert self.total(whole_q, record("q", head=3)) == 176
        assert self.total(whole_up, record("q", head=3)) == 176 + 176


def circuit(
    head: int, rank: float, matrix: str = "qk", group_size: int = 4, suggest: str = "low_rank"
) -> dict:
    """A failed circuit item (hidden x hidden, rank <= head_dim 8) of query head ``head``."""
    return {
        **record(matrix, suggest, rank=rank, head=head),
        "kv_head": head // group_size,
        "shape": [32, 32],
    }


class TestCircuitCandidates:
    """A circuit of rank r cuts its heads' Q (O) rows and the shared K (V) rows to r."""

    def test_a_group_without_recorded_singular_values_has_no_truncation_error(self) -> None:
        """The rank comes from the items' metrics; with no singular values in the records
        (nothing to measure the discarded energy with), the row still prices the cut and
        gives no error rather than failing."""
        members = [{**circuit(h, 2), "singular_values": []} for h in (4, 5, 6, 7)]
        (row,) = pruning_candidates(members, "energy_rank(p=0.95)", GEOMETRY)
        assert (row.label, row.rank, row.saved, row.error) == ("L0 H4-7 qk", 2, 5 * 6 * 32, None)

    def test_a_complete_group_is_one_candidate_at_its_largest_rank(self) -> None:
        members = [circuit(4, 2), circuit(5, 3), circuit(6, 2), circuit(7, 1)]
        (candidate,) = pruning_candidates(members, "energy_rank(p=0.95)", GEOMETRY)
        assert candidate.label == "L0 H4-7 qk"
        assert candidate.rank == 3
        # four Q slices and the shared K slice, 8 x 32 each, cut from 8 rows to 3
        assert (candidate.params_before, candidate.params_after) == (5 * 256, 5 * 3 * 32)
        assert candidate.break_even == 8
        assert candidate.needs == ""
        entry = candidate_record(candidate)
        assert entry["needs_heads"] is None
        assert entry["params_saved"] == 5 * 5 * 32

    def test_an_incomplete_group_is_listed_unpriced_naming_what_it_needs(self) -> None:
        members = [circuit(4, 2, "ov"), circuit(6, 2, "ov")]
        candidates = pruning_candidates(members, "energy_rank(p=0.95)", GEOMETRY)
        assert [c.label for c in candidates] == ["L0 H4 ov", "L0 H6 ov"]
        for candidate, head in zip(candidates, (4, 6), strict=True):
            assert candidate.saved == 0
            assert candidate.needs == "needs H4-7 (K/V head 1)"
            assert candidate_record(candidate)["needs_heads"] == [4, 5, 6, 7]
            # its own O slice and the V slice, 8 x 32 each, nothing cut yet
            assert (candidate.params_before, candidate.params_after) == (2 * 256, 2 * 256)
            assert (candidate.rank, candidate.break_even) == (2, 8)
            assert candidate.error == pytest.approx(math.sqrt(5 / 30))  # energies 16, 9, 4, 1
            assert (candidate.heads, candidate.removal) == ((head,), None)
            assert candidate.nodeids == (f"spectral::layer00::head0{head}-ov",)

    def test_without_grouped_query_attention_each_head_is_priced(self) -> None:
        geometry = Geometry(layers=2, heads=8, kv_heads=8, head_dim=8, hidden=32)
        (candidate,) = pruning_candidates(
            [circuit(3, 2, group_size=1)], "energy_rank(p=0.95)", geometry
        )
        assert (candidate.params_before, candidate.params_after) == (2 * 256, 2 * 2 * 32)

    def test_slices_are_cut_from_the_geometrys_head_dim(self) -> None:
        """A head wider than the model (head_dim 8, hidden 4) has a 4 x 4 circuit with 4
        singular values, but its Q and K slices still have 8 rows of 4 to cut to rank 2."""
        geometry = Geometry(layers=1, heads=4, kv_heads=4, head_dim=8, hidden=4)
        narrow = {**circuit(3, 2, group_size=1), "shape": [4, 4]}
        narrow["singular_values"] = [4.0, 3.0, 2.0, 1.0]
        (candidate,) = pruning_candidates([narrow], "energy_rank(p=0.95)", geometry)
        assert (candidate.params_before, candidate.params_after) == (2 * 8 * 4, 2 * 2 * 4)
        assert candidate.break_even == 8

    def test_a_slice_cut_and_factorised_counts_its_larger_saving_once(self) -> None:
        members = [circuit(4, 3), circuit(5, 3), circuit(6, 3), circuit(7, 3)]
        cut_per_slice = (8 - 3) * 32
        candidates = pruning_candidates(
            [*members, record("q", head=5)], "energy_rank(p=0.95)", GEOMETRY
        )
        # Q slices 4, 6, 7 and K/V head 1's K slice are cut; Q slice 5 factorised (176 > 160)
        total = total_saving(candidates, GEOMETRY)
        assert total == 4 * cut_per_slice + 176
        assert isinstance(total, int)  # a count of parameters (JSON report, terminal)

    def test_a_slice_cut_deeper_than_factorised_counts_the_cut(self) -> None:
        """Cutting query head 5's Q slice to rank 1 (7 x 32 = 224 rows' worth) beats its own
        rank-2 factorisation (176), whichever candidate comes first."""
        members = [circuit(h, 1) for h in (4, 5, 6, 7)]
        candidates = pruning_candidates(
            [*members, record("q", head=5)], "energy_rank(p=0.95)", GEOMETRY
        )
        assert [c.label for c in candidates] == ["L0 H4-7 qk", "L0 H5 q"]
        assert total_saving(candidates, GEOMETRY) == 5 * 7 * 32

    def test_a_group_cut_to_head_dim_leaves_a_whole_matrix_factorisation_counting(self) -> None:
        """At rank 8 = head_dim the group's row cuts nothing, so it shrinks no Q slice and the
        whole Q matrix's factorisation (176) is what the total counts."""
        members = [circuit(h, 8) for h in (4, 5, 6, 7)]
        candidates = pruning_candidates(
            [*members, record("q", head=None)], "energy_rank(p=0.95)", GEOMETRY
        )
        assert [c.saved for c in candidates] == [176, 0]
        assert total_saving(candidates, GEOMETRY) == 176

    def test_each_kv_group_and_each_circuit_is_its_own_row(self) -> None:
        """Two complete QK groups and one OV group: three rows, each pricing its own four Q
        (O) slices and shared K (V) slice, 5 x 8 x 32 cut to its own largest rank."""
        members = [
            *(circuit(h, 3) for h in (4, 5, 6, 7)),
            *(circuit(h, 2) for h in (0, 1, 2, 3)),
            *(circuit(h, 1, "ov") for h in (0, 1, 2, 3)),
        ]
        candidates = pruning_candidates(members, "energy_rank(p=0.95)", GEOMETRY)
        assert [(c.label, c.rank, c.saved) for c in candidates] == [
            ("L0 H0-3 ov", 1, 5 * 7 * 32),
            ("L0 H0-3 qk", 2, 5 * 6 * 32),
            ("L0 H4-7 qk", 3, 5 * 5 * 32),
        ]
        assert candidates[2].nodeids == tuple(
            f"spectral::layer00::head0{h}-qk" for h in (4, 5, 6, 7)
        )
        assert candidate_record(candidates[0])["nodeids"] == [
            f"spectral::layer00::head0{h}-ov" for h in (0, 1, 2, 3)
        ]

    def test_an_unpriced_head_still_prices_its_own_removal(self) -> None:
        """Dropping query head 4 (its Q rows and O columns, 2 x 8 x 32) needs no other head."""
        members = [circuit(h, 2, suggest="remove_head") for h in (4, 6)]
        candidates = pruning_candidates(members, "energy_rank(p=0.95)", GEOMETRY)
        assert [(c.label, c.removal, c.saved) for c in candidates] == [
            ("L0 H4 qk", 512, 512),
            ("L0 H6 qk", 512, 512),
        ]
        assert total_saving(candidates, GEOMETRY) == 2 * 512

    def test_removing_a_complete_groups_heads_frees_each_query_heads_q_and_o(self) -> None:
        """A circuit rule asking for head removal prices dropping every query head of the
        row: per head its Q rows and O columns, 8 x 32 + 32 x 8 (README, params saved). The
        shared K/V head's rows are not counted (a conservative figure): they go only where a
        K or V item's own rule asks for removal."""
        members = [circuit(h, 2, suggest="remove_head") for h in (4, 5, 6, 7)]
        (candidate,) = pruning_candidates(members, "energy_rank(p=0.95)", GEOMETRY)
        assert candidate.removal == 4 * (8 * 32 + 32 * 8)
        # the cut to rank 2 saves (4 + 1) slices x (8 - 2) rows x 32 = 960, less than 2048
        assert candidate.params_before - candidate.params_after == 5 * 6 * 32
        assert candidate.saved == 4 * (8 * 32 + 32 * 8)
        assert candidate_record(candidate)["params_saved_by_removal"] == 2048

    def test_without_geometry_a_circuit_head_is_its_own_group(self) -> None:
        """Nothing sizes the group, so a head is priced alone: its Q slice and the K slice, each
        cut from the spectrum's 8 values (head_dim) to rank 2 over 32 columns."""
        (candidate,) = pruning_candidates([circuit(5, 2)], "energy_rank(p=0.95)")
        assert (candidate.heads, candidate.needs_heads, candidate.needs) == ((5,), (), "")
        assert (candidate.params_before, candidate.params_after) == (2 * 8 * 32, 2 * 2 * 32)
        assert candidate.saved == 2 * 6 * 32
        assert candidate.removal is None

    def test_a_groups_error_is_its_worst_heads_at_the_groups_rank(self) -> None:
        """Each head's circuit cut to the group's rank 3 leaves sqrt(1 - E_3) of it: 1/30 of
        the energy of 16, 9, 4, 1; a quarter of four equal values, the largest."""
        flat = {**circuit(5, 3), "singular_values": [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]}
        members = [circuit(4, 2), flat, circuit(6, 1), circuit(7, 2)]
        (candidate,) = pruning_candidates(members, "energy_rank(p=0.95)", GEOMETRY)
        assert candidate.rank == 3
        assert candidate.error == pytest.approx(0.5, rel=1e-12)
        (alone,) = pruning_candidates([circuit(4, 3)], "energy_rank(p=0.95)", GEOMETRY)
        assert alone.error == pytest.approx(math.sqrt(1 / 30), rel=1e-12)  # unpriced, its own
