"""Reading the reports a history is built from: found, parsed one at a time, every field used
checked.

Reports come from CI artefacts and shared directories, so each is read like any untrusted
file (regular files only, capped at ``MAX_REPORT_BYTES``, nesting bounded) and every field a
history uses is checked for type and range before it is used; a problem names the file and
the key. Only one report's parsed document is alive at a time: a caller keeps what it needs
(metric values, a few items' singular values) and lets the rest go.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_spectral.checkpoints.families import STACK_NAMES
from pytest_spectral.reporting.step import MAX_LABEL_CHARACTERS, MAX_STEP, Step
from pytest_spectral.results import OUTCOMES, report_number, schema_problem
from pytest_spectral.results import value_kind as _kind
from pytest_spectral.untrusted import MAX_REPORT_BYTES, UntrustedFileError, load_json

#: Reports one history may hold: a run saving every 100 steps for 500,000 steps has 5,000.
MAX_REPORTS = 10_000
#: The layout fields every report of one history shares (a history of another model's
#: reports would match node ids to different weights).
LAYOUT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
)
_MAX_NAME = 1000  # node ids, matrix names, metric keys: the plugin's are under 100 characters
_MAX_INDEX = 1_000_000  # layers and heads
_MAX_SINGULAR_VALUES = 65_536  # per item: min(m, n) of a slice


class HistoryError(ValueError):
    """A report or a set of reports that cannot make a history; the message names the file
    (or option) and the key."""


@dataclass(frozen=True)
class ReportSource:
    """One report of a history: a file, or the run in progress (its report in memory)."""

    name: str  # the path as given, or "this run"
    path: Path | None = None
    document: Mapping[str, object] | None = None

    def load(self) -> Mapping[str, object]:
        """The report, its schema and version checked; raises :class:`HistoryError`."""
        if self.document is not None:
            return self.document
        assert self.path is not None
        try:
            document = load_json(self.path, MAX_REPORT_BYTES, "report")
        except UntrustedFileError as exc:
            raise HistoryError(str(exc)) from None
        problem = schema_problem(document)
        if problem is not None:
            raise HistoryError(f"{self.name}: {problem}")
        return document


@dataclass(frozen=True)
class ReportHeader:
    """What a history keeps of each report besides its values."""

    source: ReportSource
    step: Step | None
    created: str
    layout: tuple[object, ...]
    #: ``model.stack_geometry``: the head layout of each stack with heads of its own (a
    #: vision tower), stack -> config key -> value
    stacks: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The step's label, else the report's creation time (what tables and axes show)."""
        return self.step.label if self.step is not None else self.created

    def order(self) -> tuple[object, ...]:
        """Numbered steps first, in order; then the rest by creation time."""
        number = self.step.number if self.step is not None else None
        return (number is None, number or 0, self.created, self.source.name)


@dataclass(frozen=True)
class ItemPoint:
    """One head or matrix item of one report."""

    nodeid: str
    layer: int
    head: int | None
    matrix: str
    outcome: str
    metrics: Mapping[str, float]
    #: an encoder-decoder model's stack (``None`` otherwise, and in reports before version 4)
    stack: str | None = None


def report_sources(arguments: Sequence[Path], *, what: str) -> list[ReportSource]:
    """The reports named by ``arguments``: each a report file, or a directory whose
    ``*.json`` files (not those starting with a dot: temporary files) are all reports.

    ``what`` names the option or argument in messages. Raises :class:`HistoryError` for a
    path that does not exist or is neither, or for more than :data:`MAX_REPORTS` reports.
    """
    sources: list[ReportSource] = []
    seen: set[Path] = set()  # a report named twice (itself and its directory) is read once
    for argument in arguments:
        if argument.is_dir():
            found = sorted(
                p for p in argument.iterdir() if p.suffix == ".json" and not p.name.startswith(".")
            )
        elif argument.exists():
            found = [argument]
        else:
            raise HistoryError(f"{what} {argument}: no such file or directory")
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                sources.append(ReportSource(str(path), path))
        if len(sources) > MAX_REPORTS:
            raise HistoryError(
                f"{what}: more than {MAX_REPORTS} reports; give a directory holding fewer"
            )
    return sources


def read_header(source: ReportSource, document: Mapping[str, object]) -> ReportHeader:
    model = document.get("model")
    if not isinstance(model, dict):
        raise HistoryError(f"{source.name}: key 'model' must be an object, got {_kind(model)}")
    created = document.get("created")
    if not isinstance(created, str) or len(created) > 40:
        raise HistoryError(
            f"{source.name}: key 'created' must be a timestamp, got {_kind(created)}"
        )
    return ReportHeader(
        source,
        _step(source.name, document.get("step")),
        created,
        tuple(model.get(key) for key in LAYOUT_FIELDS),
        _stack_geometry(source.name, model.get("stack_geometry", {})),
    )


def _stack_geometry(name: str, value: object) -> dict[str, Mapping[str, object]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise HistoryError(
            f"{name}: key 'model.stack_geometry' must be an object of objects, got {_kind(value)}"
        )
    return {str(stack): fields for stack, fields in value.items()}


def _step(name: str, value: object) -> Step | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise HistoryError(f"{name}: key 'step' must be an object or null, got {_kind(value)}")
    label, number, source = value.get("label"), value.get("number"), value.get("source")
    if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL_CHARACTERS:
        raise HistoryError(f"{name}: step.label must be a short string, got {_kind(label)}")
    if number is not None and (
        isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= MAX_STEP
    ):
        raise HistoryError(
            f"{name}: step.number must be a non-negative integer or null, got {_kind(number)}"
        )
    if not isinstance(source, str) or len(source) > 40:
        raise HistoryError(f"{name}: step.source must be a short string, got {_kind(source)}")
    return Step(label, number, source)


def read_items(
    source: ReportSource, document: Mapping[str, object], keys: Sequence[str]
) -> Iterator[ItemPoint]:
    """Every item of the report with its outcome and the metrics ``keys`` it has, each field
    checked."""
    items = document.get("items")
    if not isinstance(items, list):
        raise HistoryError(f"{source.name}: key 'items' must be a list, got {_kind(items)}")
    for index, item in enumerate(items):
        where = f"{source.name}: items[{index}]"
        if not isinstance(item, dict):
            raise HistoryError(f"{where} must be an object, got {_kind(item)}")
        nodeid, matrix = item.get("nodeid"), item.get("matrix")
        layer, head, outcome = item.get("layer"), item.get("head"), item.get("outcome")
        metrics, stack = item.get("metrics"), item.get("stack")
        if stack is not None and stack not in STACK_NAMES:
            raise HistoryError(
                f"{where}.stack must be one of {', '.join(STACK_NAMES)} or null, got {_kind(stack)}"
            )
        if not isinstance(nodeid, str) or not 0 < len(nodeid) <= _MAX_NAME:
            raise HistoryError(f"{where}.nodeid must be a string, got {_kind(nodeid)}")
        if not isinstance(matrix, str) or not 0 < len(matrix) <= _MAX_NAME:
            raise HistoryError(f"{where}.matrix must be a string, got {_kind(matrix)}")
        if not _index(layer):
            raise HistoryError(f"{where}.layer must be a non-negative integer, got {_kind(layer)}")
        if head is not None and not _index(head):
            raise HistoryError(f"{where}.head must be an integer or null, got {_kind(head)}")
        if outcome not in OUTCOMES:
            raise HistoryError(
                f"{where}.outcome must be one of {', '.join(OUTCOMES)}, got {_kind(outcome)}"
            )
        if not isinstance(metrics, dict):
            raise HistoryError(f"{where}.metrics must be an object, got {_kind(metrics)}")
        yield ItemPoint(
            nodeid,
            layer,  # type: ignore[arg-type]
            head,  # type: ignore[arg-type]
            matrix,
            outcome,  # type: ignore[arg-type]
            {key: number(f"{where}.metrics.{key}", metrics[key]) for key in keys if key in metrics},
            stack,
        )


def singular_values(
    source: ReportSource, document: Mapping[str, object], nodeids: frozenset[str]
) -> dict[str, list[float]]:
    """The singular values of the items ``nodeids`` (those the report has), checked."""
    found: dict[str, list[float]] = {}
    items = document.get("items")
    for index, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, dict) or item.get("nodeid") not in nodeids:
            continue
        values = item.get("singular_values")
        where = f"{source.name}: items[{index}].singular_values"
        if not isinstance(values, list) or len(values) > _MAX_SINGULAR_VALUES:
            raise HistoryError(
                f"{where} must be a list of at most {_MAX_SINGULAR_VALUES} numbers, "
                f"got {_kind(values)}"
            )
        found[item["nodeid"]] = [number(where, v) for v in values]
    return found


def number(where: str, value: object) -> float:
    try:
        return report_number(where, value)
    except ValueError as exc:
        raise HistoryError(str(exc)) from None


def _index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_INDEX
