"""Per-item records and the JSON report (the machine interface for CI).

A record is a plain JSON-ready dict. It is attached to the item's ``TestReport``, which is
how it crosses from pytest-xdist workers to the controller, so a parallel run produces
exactly the report a single process does.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_spectral import __version__
from pytest_spectral.checkpoints.checkpoint import Checkpoint
from pytest_spectral.judging.evaluation import Verdict
from pytest_spectral.judging.rules import RuleSet
from pytest_spectral.reporting.files import write_text_atomically
from pytest_spectral.reporting.step import Step
from pytest_spectral.results import OUTCOMES, SCHEMA, SCHEMA_VERSION, HeadSpectrum, Record

if TYPE_CHECKING:  # read only with --spectral-baseline
    from pytest_spectral.judging.baseline import Baseline

#: what every JSON report has within its first bytes: an earlier report at the path is
#: recognised by it (``reporting.files.check_replaceable``)
REPORT_MARK = f'"schema": "{SCHEMA}"'.encode()


def json_number(value: float) -> float | str:
    """JSON has no nan or inf; write them as strings that ``float()`` still parses."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def json_numbers(values: Mapping[str, float]) -> dict[str, float | str]:
    """:func:`json_number` of every value; a copy as it is when all are finite (the usual
    case, tested in one pass instead of two calls per value: a report has 20 per item)."""
    if all(map(math.isfinite, values.values())):
        return dict(values)
    return {key: json_number(v) for key, v in values.items()}


def item_record(
    *,
    nodeid: str,
    stack: str | None = None,
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
        "stack": stack,
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
        "metrics": json_numbers(spectrum.metrics),
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
                "window": b.rule.window,
                "reference_step": b.reference_step,
                "severity": b.severity,
                "bound": b.bound,
                "suggest": b.suggestion,
            }
            for b in verdict.broken
        ],
        "error": None,
    }


def unrecorded_record(
    *,
    nodeid: str,
    stack: str | None = None,
    layer: int,
    head: int | None,
    matrix: str,
    kv_head: int | None,
    shape: tuple[int, int],
    outcome: str,
    error: str | None,
) -> Record:
    """The record of an item that has no result (it crashed, raised, was skipped or never
    ran): where it is, its ``outcome`` and pytest's one-line ``error``; no values."""
    return {
        "nodeid": nodeid,
        "stack": stack,
        "layer": layer,
        "scope": "matrix" if head is None else "head",
        "head": head,
        "matrix": matrix,
        "kv_head": kv_head,
        "shape": list(shape),
        "status": "no_result",
        "outcome": outcome,
        "nonfinite_count": None,
        "method": None,
        "floor_limited": False,
        "singular_values": [],
        "metrics": {},
        "broken_rules": [],
        "error": error,
    }


def _own_geometries(checkpoint: Checkpoint) -> dict[str, object]:
    """``stack_geometry``: the head geometry of each stack with heads of its own (a
    multimodal wrapper's vision tower, ``--spectral-vision``); absent when none has."""
    own = checkpoint.own_geometries()
    return {"stack_geometry": own} if own else {}


def build_report(
    *,
    checkpoint: Checkpoint,
    model_argument: str,
    from_hub: bool = False,
    rules: RuleSet,
    baseline: Baseline | None = None,
    settings: Mapping[str, object],
    records: Iterable[Record],
    candidates: Iterable[Record],
    regressions: Iterable[Record],
    params_saved: int,
    step: Step | None = None,
) -> dict[str, object]:
    """The report: model, rules, baseline and settings, a summary, every item, the
    regressions, then the pruning candidates.

    ``from_hub`` says that ``model_argument`` was a hub id (the model's ``path`` is then its
    snapshot in the cache); ``path`` is always resolved and absolute.

    ``records`` hold every collected item, those without a result included (see
    :func:`unrecorded_record`); the summary counts them by outcome.

    ``candidates`` are the entries of ``candidates.candidate_record``, largest saving first;
    ``params_saved`` is what acting on all of them frees, each weight counted once.
    ``regressions`` are the entries of ``candidates.regression_record``.
    ``step`` is the checkpoint's place in a training run (``--spectral-step`` or what the
    checkpoint says), null when unknown.
    """
    items = sorted(records, key=lambda r: str(r["nodeid"]))
    g = checkpoint.geometry
    counts = {o: sum(r["outcome"] == o for r in items) for o in OUTCOMES}
    candidates, regressions = list(candidates), list(regressions)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "plugin_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "step": None if step is None else step.as_json(),
        "model": {
            "argument": model_argument,
            "source": "hub" if from_hub else "local",
            "path": str(checkpoint.root.resolve()),
            "model_type": checkpoint.model_type,
            "num_hidden_layers": g.layers,
            "stacks": (
                {span.name: span.layers for span in checkpoint.stacks}
                if checkpoint.stacks
                else None
            ),
            "num_attention_heads": g.heads,
            "num_key_value_heads": g.kv_heads,
            "head_dim": g.head_dim,
            "hidden_size": g.hidden,
            "dtype": checkpoint.dtype,
            "files": checkpoint.file_names,
            **_own_geometries(checkpoint),
        },
        "rules": {
            "path": str(rules.path.resolve()) if rules.path else None,
            "sha256": rules.sha256,
            "count": len(rules.rules),
        },
        "baseline": (
            {
                "path": str(baseline.path.resolve()),
                "sha256": baseline.sha256,
                "computed": list(baseline.computed),
            }
            if baseline is not None
            else None
        ),
        "settings": dict(settings),
        "summary": {
            "items": len(items),
            **counts,
            "regressions": len(regressions),
            "candidates": len(candidates),
            "params_saved": params_saved,
        },
        "items": items,
        "regressions": regressions,
        "candidates": candidates,
    }


def write_report(path: Path, report: Mapping[str, object]) -> None:
    write_text_atomically(path, json.dumps(report, indent=1, allow_nan=False) + "\n")
