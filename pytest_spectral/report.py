"""Per-item records, pruning candidates and the JSON report (the machine interface for CI).

A record is a plain JSON-ready dict. It is attached to the item's ``TestReport``, which is
how it crosses from pytest-xdist workers to the controller, so a parallel run produces
exactly the report a single process does.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pytest_spectral import __version__
from pytest_spectral.checkpoint import Checkpoint, Geometry
from pytest_spectral.evaluation import Verdict
from pytest_spectral.results import HeadSpectrum
from pytest_spectral.rules import RuleSet

SCHEMA = "pytest-spectral-report"
SCHEMA_VERSION = 1
Record = dict[str, object]


def json_number(value: float) -> float | str:
    """JSON has no nan or inf; write them as strings that ``float()`` still parses."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def item_record(
    *,
    nodeid: str,
    layer: int,
    head: int | None,
    matrix: str,
    kv_head: int | None,
    shape: tuple[int, int],
    spectrum: HeadSpectrum,
    verdict: Verdict,
) -> Record:
    return {
        "nodeid": nodeid,
        "layer": layer,
        "scope": "matrix" if head is None else "head",
        "head": head,
        "matrix": matrix,
        "kv_head": kv_head,
        "shape": list(shape),
        "status": verdict.status,
        "outcome": verdict.outcome,
        "nonfinite_count": spectrum.nonfinite,
        "method": spectrum.method,
        "floor_limited": spectrum.floor_limited,
        "singular_values": (
            spectrum.singular_values  # finite unless the weights were not
            if not spectrum.nonfinite
            else [json_number(v) for v in spectrum.singular_values]
        ),
        "metrics": {key: json_number(v) for key, v in spectrum.metrics.items()},
        "broken_rules": [
            {
                "rule": b.rule.name,
                "metric": b.rule.request.key,
                "value": json_number(b.value),
                "min": b.rule.min,
                "max": b.rule.max,
                "min_change": b.rule.min_change,
                "max_change": b.rule.max_change,
                "baseline": None if b.baseline is None else json_number(b.baseline),
                "severity": b.severity,
                "suggest": b.rule.suggest,
            }
            for b in verdict.broken
        ],
    }


@dataclass(frozen=True)
class Candidate:
    """A failed or warned item, and what compressing it would save (an upper bound).

    ``rank`` is the smallest rank keeping the configured energy; a rank-r factorisation of an
    m x n matrix keeps ``r (m + n)`` of its ``m n`` parameters, which saves anything only below
    the break-even rank ``m n / (m + n)``; its relative Frobenius error is ``sqrt(1 - E_r)``
    (Eckart-Young). ``removal`` is what dropping the whole head saves, when a rule asks for it.
    """

    record: Record
    rank: int | None
    error: float | None
    params_before: int
    params_after: int
    removal: int | None = None

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


def pruning_candidates(
    records: Iterable[Record], rank_metric: str, geometry: Geometry | None = None
) -> list[Candidate]:
    """Failed and warned items as candidates, largest saving first.

    ``rank_metric`` names the ``energy_rank`` metric whose value is the suggested rank.
    ``geometry`` sizes whole-head removal for rules with ``suggest = "remove_head"``.
    """
    result = []
    for record in records:
        if record["outcome"] == "passed":
            continue
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
            )
        )
    return sorted(result, key=lambda c: (-c.saved, c.record["nodeid"]))


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


def build_report(
    *,
    checkpoint: Checkpoint,
    model_argument: str,
    rules: RuleSet,
    settings: Mapping[str, object],
    records: Iterable[Record],
) -> dict[str, object]:
    items = sorted(records, key=lambda r: str(r["nodeid"]))
    g = checkpoint.geometry
    counts = {o: sum(r["outcome"] == o for r in items) for o in ("passed", "failed", "warned")}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "plugin_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "model": {
            "argument": model_argument,
            "path": str(checkpoint.root),
            "model_type": checkpoint.model_type,
            "num_hidden_layers": g.layers,
            "num_attention_heads": g.heads,
            "num_key_value_heads": g.kv_heads,
            "head_dim": g.head_dim,
            "hidden_size": g.hidden,
            "dtype": checkpoint.dtype,
            "files": [str(p.relative_to(checkpoint.root)) for p in checkpoint.files],
        },
        "rules": {
            "path": str(rules.path) if rules.path else None,
            "sha256": rules.sha256,
            "count": len(rules.rules),
        },
        "settings": dict(settings),
        "summary": {"items": len(items), **counts},
        "items": items,
    }


def write_report(path: Path, report: Mapping[str, object]) -> None:
    write_text_atomically(path, json.dumps(report, indent=1, allow_nan=False) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
