"""Pruning candidates and regressions: what a failed or warned slice calls for.

A broken rule means one of two things. A value beyond a bound on its metric's compressible
side (a concentrated spectrum, a collapsed effective rank: ``MetricSpec.compressible``) says
the slice has low-rank structure: a *pruning candidate*, priced here. Anything else is a
*regression*, damage rather than compressibility: non-finite weights, an all-zero slice, a
drift against the baseline, an undefined value, a bound on the other side (a norm that blew
up). A rule's ``suggest`` overrides the metric's default (``"none"`` makes it a regression).
A slice can be both when it broke rules of both kinds.

Under grouped-query attention the query heads of a group share one K and one V slice, so
their K (or V) items hold the same spectrum and break the same rules. Counting each of them
would list one matrix several times and add its savings several times over; a candidate is
therefore one *slice*, naming every query head whose item shares it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pytest_spectral.checkpoints.checkpoint import Geometry
from pytest_spectral.results import Record


@dataclass(frozen=True)
class Candidate:
    """A slice that broke a rule suggesting pruning, and what that would save (an upper bound).

    ``rank`` is the smallest rank keeping the configured energy; a rank-r factorisation of an
    m x n matrix keeps ``r (m + n)`` of its ``m n`` parameters, which saves anything only below
    the break-even rank ``m n / (m + n)``; its relative Frobenius error is ``sqrt(1 - E_r)``
    (Eckart-Young). ``removal`` is what dropping the whole head saves, when a rule asks for it.
    ``record`` is the item of the lowest query head; ``heads`` lists every query head whose
    item shares the slice (one head for Q and O, a whole group for a shared K/V slice).
    """

    record: Record
    rank: int | None
    error: float | None
    params_before: int
    params_after: int
    removal: int | None = None
    heads: tuple[int, ...] = ()
    nodeids: tuple[str, ...] = ()

    @property
    def break_even(self) -> float:
        m, n = self.record["shape"]  # type: ignore[misc]
        return m * n / (m + n)

    @property
    def saved(self) -> int:
        return max(self.removal or 0, self.params_before - self.params_after)

    @property
    def saving_fraction(self) -> float:
        return max(0, self.params_before - self.params_after) / self.params_before

    @property
    def label(self) -> str:
        return _label(self.record, self.heads)

    @property
    def rules(self) -> list[Record]:
        """The ``broken_rules`` entries that suggest pruning."""
        return _pruning_rules(self.record)


def pruning_candidates(
    records: Iterable[Record], rank_metric: str, geometry: Geometry | None = None
) -> list[Candidate]:
    """Failed and warned slices that broke a rule suggesting pruning, largest saving first.

    ``rank_metric`` names the ``energy_rank`` metric whose value is the suggested rank.
    ``geometry`` sizes whole-head removal for rules with ``suggest = "remove_head"``.
    Items of one shared K/V slice that broke the same rules become one candidate. A slice with
    non-finite or all-zero weights is never a candidate: its spectrum prices nothing.
    """
    result = []
    for members in _slices(records, lambda r: r["status"] == "ok" and bool(_pruning_rules(r))):
        record = members[0]
        m, n = record["shape"]  # type: ignore[misc]
        value = record["metrics"].get(rank_metric)  # type: ignore[attr-defined]
        rank = int(value) if isinstance(value, int | float) and math.isfinite(value) else None
        before = m * n
        after = before if rank is None else min(before, rank * (m + n))
        result.append(
            Candidate(
                record,
                rank,
                _truncation_error(record, rank),
                before,
                after,
                _removal(record, geometry),
                _heads(members),
                tuple(str(r["nodeid"]) for r in members),
            )
        )
    return sorted(result, key=lambda c: (-c.saved, c.nodeids))


@dataclass(frozen=True)
class Regression:
    """A failed or warned slice whose problem is damage, not compressibility.

    ``record`` is the item of the lowest query head; ``heads`` every query head whose item
    shares the slice; ``problems`` the status (``nonfinite``, ``zero_matrix``) if not ok,
    and the ``broken_rules`` entries that suggest no pruning.
    """

    record: Record
    heads: tuple[int, ...]
    nodeids: tuple[str, ...]

    @property
    def label(self) -> str:
        return _label(self.record, self.heads)

    @property
    def rules(self) -> list[Record]:
        return [b for b in self.record["broken_rules"] if b["suggest"] == "none"]  # type: ignore[attr-defined, index]


def regressions(records: Iterable[Record]) -> list[Regression]:
    """Failed and warned slices with non-finite or zero weights, or a broken rule that
    suggests no pruning; failed before warned, then by node id."""
    found = [
        Regression(members[0], _heads(members), tuple(str(r["nodeid"]) for r in members))
        for members in _slices(records, lambda r: r["status"] != "ok" or _regression_rules(r))
    ]
    return sorted(found, key=lambda g: (g.record["outcome"] != "failed", g.nodeids))


def regression_record(regression: Regression) -> Record:
    """The JSON report's entry for a regression."""
    r = regression.record
    return {
        "nodeids": list(regression.nodeids),
        "layer": r["layer"],
        "matrix": r["matrix"],
        "heads": list(regression.heads),
        "kv_head": r["kv_head"],
        "shape": r["shape"],
        "outcome": r["outcome"],
        "status": r["status"],
        "rules": [b["rule"] for b in regression.rules],
    }


def _pruning_rules(record: Record) -> list[Record]:
    return [b for b in record["broken_rules"] if b["suggest"] != "none"]  # type: ignore[attr-defined, index]


def _regression_rules(record: Record) -> bool:
    return any(b["suggest"] == "none" for b in record["broken_rules"])  # type: ignore[attr-defined, index]


def _slices(records: Iterable[Record], wanted: Callable[[Record], bool]) -> Iterator[list[Record]]:
    """The failed and warned items that ``wanted`` accepts, grouped by slice and verdict."""
    groups: dict[tuple[object, ...], list[Record]] = {}
    for record in sorted(records, key=lambda r: str(r["nodeid"])):
        if record["outcome"] in ("failed", "warned") and wanted(record):
            groups.setdefault(_slice_key(record), []).append(record)
    return iter(groups.values())


def _heads(members: list[Record]) -> tuple[int, ...]:
    return tuple(sorted(int(r["head"]) for r in members if r["head"] is not None))  # type: ignore[call-overload]


def total_saving(candidates: Iterable[Candidate], geometry: Geometry) -> int:
    """Parameters freed by acting on every candidate, each weight counted once.

    Candidates overlap: a removed query head takes its Q and O slices with it whatever else was
    suggested for them, a removed K/V head takes its whole group, and a whole-matrix
    factorisation is an alternative to factorising that matrix's heads (it counts only where
    the matrix has no head candidates).
    """
    candidates = list(candidates)
    removed_query: set[tuple[object, int]] = set()  # (layer, query head): its Q rows, O columns
    removed_kv: set[tuple[object, object]] = set()  # (layer, K/V head): its K and V rows
    for c in candidates:
        layer, matrix = c.record["layer"], c.record["matrix"]
        if not c.removal:
            continue
        if matrix in ("k", "v"):
            kv = int(c.record["kv_head"])  # type: ignore[call-overload]
            removed_kv.add((layer, kv))
            group = range(kv * geometry.group_size, (kv + 1) * geometry.group_size)
            removed_query.update((layer, head) for head in group)
        else:
            removed_query.update((layer, head) for head in c.heads)
    slice_params = geometry.head_dim * geometry.hidden
    total = 2 * slice_params * (len(removed_query) + len(removed_kv))
    with_heads = {(c.record["layer"], c.record["matrix"]) for c in candidates if c.heads}
    for c in candidates:
        layer, matrix = c.record["layer"], c.record["matrix"]
        if not c.heads:  # a whole matrix: its heads' suggestions stand instead, if any
            superseded = (layer, matrix) in with_heads
        elif matrix in ("k", "v"):
            superseded = (layer, c.record["kv_head"]) in removed_kv
        else:
            superseded = all((layer, head) in removed_query for head in c.heads)
        if not superseded:
            total += c.params_before - c.params_after
    return total


def candidate_record(candidate: Candidate) -> Record:
    """The JSON report's entry for a candidate."""
    r = candidate.record
    return {
        "nodeids": list(candidate.nodeids),
        "layer": r["layer"],
        "matrix": r["matrix"],
        "heads": list(candidate.heads),
        "kv_head": r["kv_head"],
        "shape": r["shape"],
        "outcome": r["outcome"],
        "rules": [b["rule"] for b in candidate.rules],
        "suggested_rank": candidate.rank,
        "relative_error": candidate.error,
        "break_even_rank": candidate.break_even,
        "params": candidate.params_before,
        "params_after_factorisation": candidate.params_after,
        "params_saved": candidate.saved,
        "params_saved_by_removal": candidate.removal,
    }


def _slice_key(record: Record) -> tuple[object, ...]:
    """Items of the same slice with the same verdict share a key; other items never do."""
    shared = record["matrix"] in ("k", "v") and record["kv_head"] is not None
    slice_index = ("kv", record["kv_head"]) if shared else ("head", record["head"])
    verdict = tuple(
        (b["rule"], b["severity"], b["baseline"])  # type: ignore[index]
        for b in record["broken_rules"]  # type: ignore[attr-defined]
    )
    return (
        record["layer"],
        record["matrix"],
        record["scope"],
        slice_index,
        record["outcome"],
        record["status"],
        verdict,
    )


def _label(record: Record, heads: tuple[int, ...]) -> str:
    """``L2 H4-7 k`` for a K slice shared by query heads 4 to 7; ``L0 gate`` for a matrix."""
    shown = f" H{_head_list(heads)}" if heads else ""
    return f"L{record['layer']}{shown} {record['matrix']}"


def _head_list(heads: tuple[int, ...]) -> str:
    """4-7 for a contiguous run, 1,5 otherwise."""
    if len(heads) > 1 and heads == tuple(range(heads[0], heads[-1] + 1)):
        return f"{heads[0]}-{heads[-1]}"
    return ",".join(map(str, heads))


def _truncation_error(record: Record, rank: int | None) -> float | None:
    """sqrt(1 - E_r): the relative Frobenius error of the best rank-r approximation."""
    values = [v for v in record["singular_values"] if isinstance(v, float)]  # type: ignore[attr-defined]
    if rank is None or not values:
        return None
    energy = [v * v for v in values]
    total = sum(energy)
    return math.sqrt(max(0.0, 1 - sum(energy[:rank]) / total)) if total > 0 else None


def _removal(record: Record, geometry: Geometry | None) -> int | None:
    """Parameters freed by dropping the head, if a broken rule suggests it.

    A query head takes its Q rows and O columns with it; a K/V head can only go together with
    every query head that shares it (their Q rows and O columns, and its K and V rows).
    """
    asked = any(b.get("suggest") == "remove_head" for b in record["broken_rules"])  # type: ignore[attr-defined, union-attr]
    if not asked or geometry is None or record["head"] is None:
        return None
    per_query_head = 2 * geometry.head_dim * geometry.hidden
    if record["matrix"] in ("k", "v"):
        return geometry.group_size * per_query_head + 2 * geometry.head_dim * geometry.hidden
    return per_query_head
