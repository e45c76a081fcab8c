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

A circuit is priced by what its rank allows: a QK circuit ``W_Q_h^T W_K_g`` of rank r is
``(U_r S_r^1/2)(S_r^1/2 V_r^T)``, so the head's Q rows and its K/V head's K rows can both be
cut from ``head_dim`` to r with the same attention scores (an OV circuit likewise cuts the
head's O columns and the V rows). The K (or V) slice is shared by the group's query heads, so
it can only be cut once every one of them can: a circuit candidate is priced only when the
whole group is a candidate, as one row cutting every head's Q (O) slice and the shared K (V)
slice to the largest rank among them; otherwise it is listed unpriced, naming the heads it
needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pytest_spectral.checkpoints.checkpoint import CIRCUITS, Geometry
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
    #: a circuit's cut saves anything below head_dim (its rows are cut, not factorised)
    cut_limit: int | None = None
    #: a circuit candidate left unpriced: the query heads sharing its K/V head, all of which
    #: must be candidates of the same circuit for the shared slice to be cut
    needs_heads: tuple[int, ...] = ()

    @property
    def break_even(self) -> float:
        if self.cut_limit is not None:
            return float(self.cut_limit)
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
    def needs(self) -> str:
        """What an unpriced circuit candidate needs, in words ("" when priced)."""
        if not self.needs_heads:
            return ""
        return f"needs H{_head_list(self.needs_heads)} (K/V head {self.record['kv_head']})"

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
    circuits: list[list[Record]] = []
    for members in _slices(records, lambda r: r["status"] == "ok" and bool(_pruning_rules(r))):
        record = members[0]
        if record["matrix"] in CIRCUITS and record["head"] is not None:
            circuits.append(members)
            continue
        m, n = record["shape"]  # type: ignore[misc]
        rank = _rank(record, rank_metric)
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
    result += _circuit_candidates(
        [m for members in circuits for m in members], rank_metric, geometry
    )
    return sorted(result, key=lambda c: (-c.saved, c.nodeids))


def _circuit_candidates(
    records: list[Record], rank_metric: str, geometry: Geometry | None
) -> list[Candidate]:
    """Circuit candidates, priced per K/V group (see the module docstring).

    A complete group (every query head sharing the K/V head is a candidate of this circuit in
    this layer; one head without grouped-query attention) becomes one candidate cutting the
    heads' Q (O) slices and the shared K (V) slice from ``head_dim`` to the largest suggested
    rank among them: ``params`` counts those ``(heads + 1)`` slices. Without ``geometry``
    (nothing to size the group with) each head stands alone.
    """
    groups: dict[tuple[object, ...], list[Record]] = {}
    for record in records:
        key = (_place(record), record["matrix"], record["kv_head"])
        groups.setdefault(key, []).append(record)
    result = []
    for members in groups.values():
        members.sort(key=lambda r: int(r["head"]))  # type: ignore[call-overload]
        heads = tuple(int(r["head"]) for r in members)  # type: ignore[call-overload]
        d = geometry.head_dim if geometry else len(members[0]["singular_values"])  # type: ignore[arg-type]
        hidden = int(members[0]["shape"][0])  # type: ignore[index]
        group = _query_group(members[0], geometry)
        ranks = [_rank(r, rank_metric) for r in members]
        if set(group) <= set(heads) and None not in ranks:
            rank = max(ranks)  # type: ignore[type-var]
            before = (len(heads) + 1) * d * hidden
            after = (len(heads) + 1) * min(d, rank) * hidden  # type: ignore[type-var]
            errors = [_truncation_error(r, rank) for r in members]  # type: ignore[arg-type]
            result.append(
                Candidate(
                    members[0],
                    rank,  # type: ignore[arg-type]
                    max((e for e in errors if e is not None), default=None),
                    before,
                    after,
                    _group_removal(members[0], geometry, len(heads)),
                    heads,
                    tuple(str(r["nodeid"]) for r in members),
                    cut_limit=d,
                )
            )
            continue
        for record, rank in zip(members, ranks, strict=True):
            params = 2 * d * hidden
            result.append(
                Candidate(
                    record,
                    rank,
                    _truncation_error(record, rank),
                    params,
                    params,
                    _removal(record, geometry),
                    (int(record["head"]),),  # type: ignore[call-overload]
                    (str(record["nodeid"]),),
                    cut_limit=d,
                    needs_heads=group,
                )
            )
    return result


def _group_removal(record: Record, geometry: Geometry | None, heads: int) -> int | None:
    """What removing every query head of a circuit group frees, if a broken rule asks."""
    single = _removal(record, geometry)
    return None if single is None else single * heads


def _query_group(record: Record, geometry: Geometry | None) -> tuple[int, ...]:
    """The query heads sharing the record's K/V head (just its own head without geometry)."""
    if geometry is None or record["kv_head"] is None:
        return (int(record["head"]),)  # type: ignore[call-overload]
    first = int(record["kv_head"]) * geometry.group_size  # type: ignore[call-overload]
    return tuple(range(first, first + geometry.group_size))


def _rank(record: Record, rank_metric: str) -> int | None:
    value = record["metrics"].get(rank_metric)  # type: ignore[attr-defined]
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else None


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
        "stack": r.get("stack"),
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
    suggested for them, a removed K/V head takes its whole group, a slice both factorised and
    cut through a circuit counts the larger of the two savings, and a whole-matrix
    factorisation is an alternative to factorising that matrix's heads (it counts only where
    the matrix has no head candidates).
    """
    candidates = list(candidates)
    removed_query: set[tuple[object, int]] = set()  # (layer, query head): its Q rows, O columns
    removed_kv: set[tuple[object, object]] = set()  # (layer, K/V head): its K and V rows
    for c in candidates:
        layer, matrix = _place(c.record), c.record["matrix"]
        if not c.removal:
            continue
        if matrix in ("k", "v"):
            kv = int(c.record["kv_head"])  # type: ignore[call-overload]
            removed_kv.add((layer, kv))
            group = range(kv * geometry.group_size, (kv + 1) * geometry.group_size)
            removed_query.update((layer, head) for head in group)
        else:
            removed_query.update((layer, head) for head in c.heads)
    total = len(removed_query) * _params(geometry, "q", "o") + len(removed_kv) * _params(
        geometry, "k", "v"
    )
    best: dict[tuple[object, str, object], int] = {}  # head slice -> its largest saving
    for c in candidates:
        for place, saving in _slice_savings(c):
            layer, matrix, index = place
            shared = matrix in ("k", "v")
            if (layer, index) not in (removed_kv if shared else removed_query):
                best[place] = max(best.get(place, 0), saving)
    total += sum(best.values())
    with_heads = {
        (layer, matrix) for c in candidates for (layer, matrix, _), _ in _slice_savings(c)
    }
    for c in candidates:
        if not c.heads and (_place(c.record), c.record["matrix"]) not in with_heads:
            total += c.params_before - c.params_after
    return total


def _slice_savings(candidate: Candidate) -> list[tuple[tuple[object, str, object], int]]:
    """``((layer, matrix, index), saving)`` for each head slice a candidate would shrink
    (``index`` the K/V head for k and v slices, the query head otherwise); none for a whole
    matrix."""
    r, layer, matrix = candidate.record, _place(candidate.record), candidate.record["matrix"]
    if not candidate.heads:
        return []
    saving = candidate.params_before - candidate.params_after
    if matrix in CIRCUITS:
        if candidate.needs_heads or saving <= 0:
            return []
        query, shared = CIRCUITS[str(matrix)][0], CIRCUITS[str(matrix)][1]
        per_slice = saving // (len(candidate.heads) + 1)
        cuts = [((layer, query, head), per_slice) for head in candidate.heads]
        return [*cuts, ((layer, shared, r["kv_head"]), per_slice)]
    if matrix in ("k", "v"):
        return [((layer, str(matrix), r["kv_head"]), saving)]
    return [((layer, str(matrix), head), saving) for head in candidate.heads[:1]]


def candidate_record(candidate: Candidate) -> Record:
    """The JSON report's entry for a candidate."""
    r = candidate.record
    return {
        "nodeids": list(candidate.nodeids),
        "stack": r.get("stack"),
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
        "needs_heads": list(candidate.needs_heads) or None,
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
        _place(record),
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
    return f"{layer_label(record)}{shown} {record['matrix']}"


def layer_label(record: Record) -> str:
    """``L2``, or ``cross L2`` for a layer of an encoder-decoder model's stack."""
    stack = record.get("stack")
    return f"L{record['layer']}" if stack is None else f"{stack} L{record['layer']}"


def _place(record: Record) -> tuple[object, object]:
    """(stack, layer) of an item: its layer's identity (a report before version 4 has no
    stack; its items are of a model of one stack)."""
    return record.get("stack"), record["layer"]


def _head_list(heads: tuple[int, ...]) -> str:
    """4-7 for a contiguous run, 1,5 otherwise."""
    if len(heads) > 1 and heads == tuple(range(heads[0], heads[-1] + 1)):
        return f"{heads[0]}-{heads[-1]}"
    return ",".join(map(str, heads))


def _truncation_error(record: Record, rank: int | None) -> float | None:
    """sqrt(1 - E_r): the relative Frobenius error of the best rank-r approximation.

    The values are first divided by the power of two of the largest (exact), as the metrics
    do, so that squares of weights near 1e-170 or 1e170 neither underflow nor overflow.
    """
    values = [v for v in record["singular_values"] if isinstance(v, float)]  # type: ignore[attr-defined]
    if rank is None or not values:
        return None
    largest = max(values)
    exponent = math.frexp(largest)[1] if math.isfinite(largest) else 0
    energy = [math.ldexp(v, -exponent) ** 2 for v in values]
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
    per_query_head = _params(geometry, "q", "o")
    if record["matrix"] in ("k", "v"):
        return geometry.group_size * per_query_head + _params(geometry, "k", "v")
    return per_query_head


def _params(geometry: Geometry, *matrices: str) -> int:
    """Weights in one head's slice of each of ``matrices`` (their shapes differ under
    multi-head latent attention)."""
    return sum(math.prod(geometry.slice_shape(m)) for m in matrices)
