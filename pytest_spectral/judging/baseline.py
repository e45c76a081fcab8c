"""A baseline: the JSON report of an earlier run, for rules on relative change (drift).

Items are matched by node id, which carries no model name, so a report from step 10,000
compares directly with step 20,000. A report from a model with another architecture or head
layout would match ids to different weights, so it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.checkpoints.checkpoint import Checkpoint
from pytest_spectral.results import READABLE_SCHEMA_VERSIONS, SCHEMA
from pytest_spectral.untrusted import MAX_REPORT_BYTES, UntrustedFileError, load_json

_LAYOUT_FIELDS = {
    "model_type": lambda c: c.model_type,
    "num_hidden_layers": lambda c: c.geometry.layers,
    "num_attention_heads": lambda c: c.geometry.heads,
    "num_key_value_heads": lambda c: c.geometry.kv_heads,
    "head_dim": lambda c: c.geometry.head_dim,
    "hidden_size": lambda c: c.geometry.hidden,
}


_NON_FINITE = ("nan", "inf", "-inf")


class BaselineError(ValueError):
    """A baseline report that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Baseline:
    path: Path
    metrics: Mapping[str, Mapping[str, float]]  # node id -> metric key -> value

    def for_item(self, nodeid: str) -> Mapping[str, float] | None:
        return self.metrics.get(nodeid)


def load_baseline(path: Path, checkpoint: Checkpoint) -> Baseline:
    try:
        report = load_json(path, MAX_REPORT_BYTES, "baseline report")
    except UntrustedFileError as exc:
        raise BaselineError(str(exc)) from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise BaselineError(f"{path}: not a pytest-spectral report (no schema {SCHEMA!r})")
    version = report.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
        readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        raise BaselineError(
            f"{path}: report schema version {version!r}; this plugin reads versions "
            f"{readable}: regenerate the baseline with this version"
        )
    model = report.get("model")
    if not isinstance(model, dict):
        raise BaselineError(f"{path}: key 'model' must be an object, got {_kind(model)}")
    for field, current in _LAYOUT_FIELDS.items():
        if model.get(field) != current(checkpoint):
            raise BaselineError(
                f"{path}: baseline is for a different model layout: model.{field} is "
                f"{model.get(field)!r} there and {current(checkpoint)!r} here"
            )
    return Baseline(path, _item_metrics(path, report.get("items")))


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
    """A metric value as the report writes it: a JSON number, or "nan", "inf", "-inf"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            raise BaselineError(f"{path}: {where} is out of range: {value}") from None
    if value in _NON_FINITE:
        return float(value)  # type: ignore[arg-type]
    raise BaselineError(
        f'{path}: {where} must be a number (or "nan", "inf", "-inf"), got {value!r}'
    )


def _kind(value: object) -> str:
    return f"{type(value).__name__} {value!r}"[:80]
