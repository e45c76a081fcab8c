"""A baseline: the JSON report of an earlier run, for rules on relative change (drift).

Items are matched by node id, which carries no model name, so a report from step 10,000
compares directly with step 20,000. A report from a model with another architecture or head
layout would match ids to different weights, so it is refused.

A report records every metric of its own run, which need not be every metric a later rules
file compares: a baseline recorded without rules has ``top_k_ratio`` with the default k, not
``top_k_ratio(k=5)``. Since each item also stores its full list of singular values, a metric
the report lacks is computed from them, with the same functions as a run (for metrics that
need it, with the item's shape and the report's storage dtype).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pytest_spectral.checkpoints.checkpoint import Checkpoint
from pytest_spectral.judging.metrics import MetricContext, MetricRequest
from pytest_spectral.results import SCHEMA, report_number, schema_problem
from pytest_spectral.results import value_kind as _kind
from pytest_spectral.untrusted import (
    MAX_REPORT_BYTES,
    UntrustedFileError,
    parse_json,
    read_capped,
)

_LAYOUT_FIELDS = {
    "model_type": lambda c: c.model_type,
    "num_hidden_layers": lambda c: c.geometry.layers,
    "num_attention_heads": lambda c: c.geometry.heads,
    "num_key_value_heads": lambda c: c.geometry.kv_heads,
    "head_dim": lambda c: c.geometry.head_dim,
    "hidden_size": lambda c: c.geometry.hidden,
}


class BaselineError(ValueError):
    """A baseline report that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Baseline:
    path: Path
    metrics: Mapping[str, Mapping[str, float]]  # node id -> metric key -> value
    #: SHA-256 of the report file, for the reports of the runs that compare with it
    sha256: str | None = None
    #: metric keys some item of the report lacked, computed from its singular values
    computed: tuple[str, ...] = ()

    def for_item(self, nodeid: str) -> Mapping[str, float] | None:
        return self.metrics.get(nodeid)


def load_baseline(
    path: Path, checkpoint: Checkpoint, requests: Iterable[MetricRequest] = ()
) -> Baseline:
    """Read and check the report at ``path``; ``requests`` are the metrics the rules compare,
    computed from an item's stored singular values where the report lacks them.

    Raises :class:`BaselineError` naming the file and the key that is wrong.
    """
    try:
        raw = read_capped(path, MAX_REPORT_BYTES, "baseline report")
        report = parse_json(raw, path, "baseline report")
    except UntrustedFileError as exc:
        raise BaselineError(str(exc)) from None
    problem = schema_problem(report)
    if problem is not None:
        readable_kind = isinstance(report, dict) and report.get("schema") == SCHEMA
        advice = ": regenerate the baseline with this version" if readable_kind else ""
        raise BaselineError(f"{path}: {problem}{advice}")
    model = report.get("model")
    if not isinstance(model, dict):
        raise BaselineError(f"{path}: key 'model' must be an object, got {_kind(model)}")
    for field, current in _LAYOUT_FIELDS.items():
        if model.get(field) != current(checkpoint):
            raise BaselineError(
                f"{path}: baseline is for a different model layout: model.{field} is "
                f"{model.get(field)!r} there and {current(checkpoint)!r} here"
            )
    items = report.get("items")
    metrics = _item_metrics(path, items)
    _check_stack_layouts(path, model, items, checkpoint)  # type: ignore[arg-type]
    storage = model.get("dtype") if isinstance(model.get("dtype"), str) else None
    computed = _complete(path, items, metrics, tuple(requests), storage)  # type: ignore[arg-type]
    return Baseline(path, metrics, hashlib.sha256(raw).hexdigest(), computed)


def _check_stack_layouts(
    path: Path, model: Mapping[str, object], items: list[dict[str, object]], checkpoint: Checkpoint
) -> None:
    """Refuse a baseline whose stack with heads of its own (the vision tower) has another head
    layout than this run's: its ids would match slices of other heads. A stack only one of
    the two runs analysed is not compared (its items simply have no counterpart)."""
    recorded = model.get("stack_geometry", {})
    if not isinstance(recorded, dict):
        raise BaselineError(
            f"{path}: key 'model.stack_geometry' must be an object, got {_kind(recorded)}"
        )
    for stack, here in checkpoint.own_geometries().items():
        there = recorded.get(stack)
        if there is None:
            if any(item.get("stack") == stack for item in items):
                raise BaselineError(
                    f"{path}: baseline has items of the {stack} stack but no "
                    f"model.stack_geometry.{stack}: its head layout cannot be compared; "
                    "regenerate the baseline with this version"
                )
            continue
        if not isinstance(there, dict):
            raise BaselineError(
                f"{path}: key 'model.stack_geometry.{stack}' must be an object, "
                f"got {_kind(there)}"
            )
        for key, value in here.items():
            if there.get(key) != value:
                raise BaselineError(
                    f"{path}: baseline is for a different model layout: "
                    f"model.stack_geometry.{stack}.{key} is {repr(there.get(key))[:40]} there and "
                    f"{value!r} here"
                )


def _complete(
    path: Path,
    items: list[dict[str, object]],
    metrics: dict[str, dict[str, float]],
    requests: tuple[MetricRequest, ...],
    storage: str | None,
) -> tuple[str, ...]:
    """Add to ``metrics`` each requested metric an item lacks, computed from the item's
    ``singular_values`` (items without values, like those of crashed items, stay without);
    returns the keys that were computed for some item. Items of one shape are computed in
    one batch."""
    batches: dict[tuple[MetricRequest, tuple[int, int], int], list[tuple[str, list[float]]]]
    batches = defaultdict(list)
    for index, item in enumerate(items):
        nodeid = str(item["nodeid"])
        missing = [r for r in requests if r.key not in metrics[nodeid]]
        if not missing:
            continue
        values = _singular_values(path, index, item.get("singular_values"))
        if not values:
            continue
        shape = _shape(path, index, item.get("shape"))
        for request in missing:
            batches[(request, shape, len(values))].append((nodeid, values))
    for (request, shape, _), members in batches.items():
        spectra = np.array([values for _, values in members], dtype=np.float64)
        try:
            column = np.asarray(
                request.compute(spectra, MetricContext(shape, storage)), dtype=np.float64
            ).reshape(len(members))
        except Exception as exc:  # a metric of a conftest, on values from a file
            raise BaselineError(
                f"{path}: computing {request.key} from its singular values failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        for (nodeid, _), value in zip(members, column.tolist(), strict=True):
            metrics[nodeid][request.key] = value
    return tuple(dict.fromkeys(request.key for request, _, _ in batches))


def _singular_values(path: Path, index: int, values: object) -> list[float]:
    where = f"items[{index}].singular_values"
    if not isinstance(values, list):
        raise BaselineError(f"{path}: {where} must be a list, got {_kind(values)}")
    return [_number(path, f"{where}[{i}]", v) for i, v in enumerate(values)]


def _shape(path: Path, index: int, shape: object) -> tuple[int, int]:
    valid = (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    )
    if not valid:
        raise BaselineError(
            f"{path}: items[{index}].shape must be two positive integers, got {_kind(shape)}"
        )
    return shape[0], shape[1]  # type: ignore[index]


def _item_metrics(path: Path, items: object) -> dict[str, dict[str, float]]:
    """node id -> metric -> value, every field checked; errors name the key that is wrong."""
    if not isinstance(items, list):
        raise BaselineError(f"{path}: key 'items' must be a list, got {_kind(items)}")
    metrics: dict[str, dict[str, float]] = {}
    for index, item in enumerate(items):
        where = f"items[{index}]"
        if not isinstance(item, dict):
            raise BaselineError(f"{path}: {where} must be an object, got {_kind(item)}")
        nodeid, values = item.get("nodeid"), item.get("metrics")
        if not isinstance(nodeid, str):
            raise BaselineError(f"{path}: {where}.nodeid must be a string, got {_kind(nodeid)}")
        if nodeid in metrics:
            raise BaselineError(f"{path}: {where}.nodeid {nodeid!r} appears twice")
        if not isinstance(values, dict):
            raise BaselineError(f"{path}: {where}.metrics must be an object, got {_kind(values)}")
        metrics[nodeid] = {
            str(key): _number(path, f"{where}.metrics.{key}", value)
            for key, value in values.items()
        }
    return metrics


def _number(path: Path, where: str, value: object) -> float:
    try:
        return report_number(where, value)
    except ValueError as exc:
        raise BaselineError(f"{path}: {exc}") from None
