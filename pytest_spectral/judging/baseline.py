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
from pytest_spectral.results import SCHEMA, SCHEMA_VERSION
from pytest_spectral.untrusted import MAX_REPORT_BYTES, UntrustedFileError, load_json

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

    def for_item(self, nodeid: str) -> Mapping[str, float] | None:
        return self.metrics.get(nodeid)


def load_baseline(path: Path, checkpoint: Checkpoint) -> Baseline:
    try:
        report = load_json(path, MAX_REPORT_BYTES, "baseline report")
    except UntrustedFileError as exc:
        raise BaselineError(str(exc)) from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise BaselineError(f"{path}: not a pytest-spectral report (no schema {SCHEMA!r})")
    if report.get("schema_version") != SCHEMA_VERSION:
        raise BaselineError(
            f"{path}: report schema version {report.get('schema_version')!r}; this plugin reads "
            f"version {SCHEMA_VERSION}: regenerate the baseline with this version"
        )
    model = report.get("model", {})
    for field, current in _LAYOUT_FIELDS.items():
        if model.get(field) != current(checkpoint):
            raise BaselineError(
                f"{path}: baseline is for a different model layout: {field} is "
                f"{model.get(field)!r} there and {current(checkpoint)!r} here"
            )
    try:
        metrics = {
            item["nodeid"]: {key: float(value) for key, value in item["metrics"].items()}
            for item in report["items"]
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise BaselineError(f"{path}: malformed items ({type(exc).__name__}: {exc})") from None
    return Baseline(path, metrics)
