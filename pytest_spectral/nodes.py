"""The collection tree: ``spectral`` / ``layerNN`` / ``headNN-m`` items.

One collector per layer, with that layer's items as its direct children, so that
``pytest -n auto --dist loadscope`` keeps a layer on one worker and each worker reads only
its own layers. Node ids carry no model id, so ``--lf`` and baselines work across checkpoints.
An encoder-decoder model's layers are grouped by stack: ``spectral`` / ``encoder``,
``decoder`` or ``cross`` / ``layerNN`` / items.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest
from _pytest._code.code import ReprExceptionInfo, ReprFileLocation, ReprTracebackNative

from pytest_spectral.checkpoints.checkpoint import CIRCUITS, Checkpoint
from pytest_spectral.checkpoints.families import STACK_NAMES, split_expert_item
from pytest_spectral.checkpoints.families.family import tensor_key
from pytest_spectral.checkpoints.slices import slice_span, whole_rows
from pytest_spectral.compute.engine import UnitError
from pytest_spectral.errors import SpectralRuleWarning
from pytest_spectral.judging.evaluation import Verdict, builtin_checks, judge
from pytest_spectral.printable import printable
from pytest_spectral.reporting.broken_rules import describe_broken, status_problem
from pytest_spectral.reporting.report import Record, item_record
from pytest_spectral.results import HeadSpectrum
from pytest_spectral.run import RUN_KEY, SpectralRun
from pytest_spectral.wording import counted

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr, Traceback, TracebackStyle

ROOT_NAME = "spectral"
#: how failure reports write each circuit (h the query head, g its K/V head)
CIRCUIT_PRODUCTS = {"qk": "W_Q[h]^T W_K[g]", "ov": "W_O[h] W_V[g]"}
_TOP_VALUES_SHOWN = 8
#: an item's node id; pytest-xdist's --dist loadgroup appends "@group"
_NODEID = re.compile(
    rf"^{ROOT_NAME}::(?:({'|'.join(STACK_NAMES)})::)?layer(\d+)::"
    r"(?:head(\d+)-)?(\w+|expert\d+-\w+)(?:@.*)?$"
)


class ItemPosition(NamedTuple):
    """Where an item is: its stack (``None`` in a model of one stack), layer within it, head
    (``None`` for a whole matrix) and matrix."""

    stack: str | None
    layer: int
    head: int | None
    matrix: str


def item_position(nodeid: str) -> ItemPosition | None:
    """The position an item's node id names, as the collectors below name them; ``None`` for
    another id."""
    match = _NODEID.match(nodeid)
    if match is None:
        return None
    stack, layer, head, matrix = match.groups()
    return ItemPosition(stack, int(layer), None if head is None else int(head), matrix)


def place(stack: str | None, layer: int) -> str:
    """How messages name a layer: ``layer 3``, or ``cross layer 3`` in a stack."""
    return f"layer {layer}" if stack is None else f"{stack} layer {layer}"


class SpectralCheckError(Exception):
    """Raised by an item whose head broke a rule; its text is the whole failure report, its
    first line the one-line account (see :func:`failure_repr`), ``location`` the file and
    line the failure points at (``--tb=line``, JUnit).

    The text is made printable here (control characters escaped, lines kept), so that no
    tensor, file or rule name reaches the terminal raw, whichever way pytest shows it.
    """

    def __init__(self, text: str, location: tuple[str, int]) -> None:
        super().__init__(printable(text, keep_newlines=True))
        self.location = location


def failure_repr(error: SpectralCheckError, *, line_only: bool) -> ReprExceptionInfo:
    """The failure report as pytest's own failure representation: the whole text as the
    block under the item's title (none with ``line_only``, for ``--tb=line``, which prints
    the location and the first line), its first line as the crash message.

    A plain string would do for the block, but pytest's short test summary appends the
    crash message whole, every line of it, where it shows messages untrimmed (on CI, where
    the ``CI`` or ``BUILD_NUMBER`` variable is set, and with ``-vv``): each failure block
    would be printed twice. A native-style traceback entry prints the text as it is, and
    pytest-xdist carries this representation from its workers intact.
    """
    text = str(error)
    path, lineno = error.location
    return ReprExceptionInfo(
        reprtraceback=ReprTracebackNative([] if line_only else [f"{text}\n"]),
        reprcrash=ReprFileLocation(path, lineno, text.split("\n", 1)[0]),
    )


def _headline(record: Record) -> str:
    """One line for pytest's short summary: what is wrong, most important first."""
    status = status_problem(record)
    parts = [status] if status else []
    limited = bool(record["floor_limited"])
    broken = record["broken_rules"]
    for severity in ("fail", "warn"):
        parts.extend(
            describe_broken(b, floor_limited=limited) + ("" if severity == "fail" else " (warn)")
            for b in broken  # type: ignore[attr-defined]
            if b["severity"] == severity
        )
    return "; ".join(parts)


class SpectralRoot(pytest.Collector):
    """Top-level collector appended to the session when ``--spectral-model`` is given.

    It carries the ``spectral`` marker: items inherit it (``-m spectral`` selects them all)
    without a marker object per item.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.add_marker("spectral")

    def collect(self) -> Iterator[pytest.Collector]:
        run = self.config.stash[RUN_KEY]
        for name, layer in layer_names(run):  # the layers in no stack (all, in most models)
            if "::" not in name and selected(f"{ROOT_NAME}::{name}", run.selected):
                yield LayerCollector.from_parent(self, name=name, layer=layer)
        for stack in stack_names(run):
            if selected(f"{ROOT_NAME}::{stack}", run.selected):
                yield StackCollector.from_parent(self, name=stack)


class StackCollector(pytest.Collector):
    """A stack of layers (an encoder-decoder model's ``encoder``, ``decoder``, ``cross``; a
    multimodal wrapper's ``vision`` tower): its layers."""

    def collect(self) -> Iterator[pytest.Collector]:
        run = self.config.stash[RUN_KEY]
        for name, block in layer_names(run):
            stack, _, layer = name.partition("::")
            if stack == self.name and selected(f"{self.nodeid}::{layer}", run.selected):
                yield LayerCollector.from_parent(self, name=layer, layer=block)


class LayerCollector(pytest.Collector):
    def __init__(self, *, layer: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.layer = layer
        #: failure report text -> the item that printed it (see SpectralItem._once_per_slice)
        self.printed_reports: dict[str, str] = {}

    def collect(self) -> Iterator[pytest.Item]:
        run = self.config.stash[RUN_KEY]
        for name, head, matrix in item_names(run, self.layer):
            if selected(f"{self.nodeid}::{name}", run.selected):
                yield SpectralItem.from_parent(
                    self, name=name, layer=self.layer, head=head, matrix=matrix
                )


def _from_runtest(traceback: Traceback) -> Traceback:
    """The frames from :meth:`SpectralItem.runtest` on.

    pytest cuts a test function's traceback at the test's file; an item without one keeps
    every frame of pytest's runner and pluggy above it (some 600 lines for one exception).
    An unexpected exception in an item is the plugin's (or a conftest's) to explain, so its
    frames from ``runtest`` down are what is shown (``--fulltrace`` shows them all).
    """
    code = SpectralItem.runtest.__code__
    start = next((i for i, entry in enumerate(traceback) if entry.frame.code.raw is code), 0)
    return traceback[start:]  # type: ignore[return-value]


def stack_names(run: SpectralRun) -> list[str]:
    """The stacks the run collects layers of, in order (none for a model of one stack)."""
    stacks = (run.checkpoint.position(block)[0] for block in run.layers)
    return [stack for stack in dict.fromkeys(stacks) if stack is not None]


def layer_names(run: SpectralRun) -> Iterator[tuple[str, int]]:
    """``(name, block)`` of the run's layer collectors below the root: ``layer03``,
    zero-padded to sort, or ``encoder::layer03`` in an encoder-decoder model (each stack's
    layers numbered, and padded, on their own)."""
    counts = run.checkpoint.stack_layers()
    for block in run.layers:
        stack, layer = run.checkpoint.position(block)
        width = max(2, len(str(counts[stack] - 1)))
        name = f"layer{layer:0{width}d}"
        yield (name if stack is None else f"{stack}::{name}"), block


def item_names(run: SpectralRun, block: int) -> Iterator[tuple[str, int | None, str]]:
    """``(name, head, matrix)`` of a layer's items: whole matrices first (``q``, ``down``,
    ``expert05-gate``: those the layer has, since a mixture of experts' dense and sparse
    layers differ, and a cross-attention layer has no MLP of its own), then heads
    (``head17-q``); head ``None`` for a whole matrix."""
    if "matrix" in run.scopes:
        for matrix in run.checkpoint.layer_matrices(block, run.whole_matrices):
            yield matrix, None, matrix
    if "head" not in run.scopes:
        return
    heads = run.checkpoint.geometry_at(block).heads
    width = max(2, len(str(heads - 1)))
    for head in range(heads):
        for matrix in run.head_matrices:
            yield f"head{head:0{width}d}-{matrix}", head, matrix


def spectral_ids(run: SpectralRun) -> Iterator[str]:
    """Every node id the run can collect: the root, its layers and their items."""
    yield ROOT_NAME
    for stack in stack_names(run):
        yield f"{ROOT_NAME}::{stack}"
    for layer, block in layer_names(run):
        yield f"{ROOT_NAME}::{layer}"
        for name, _, _ in item_names(run, block):
            yield f"{ROOT_NAME}::{layer}::{name}"


def selected(nodeid: str, arguments: tuple[str, ...]) -> bool:
    """Whether a node is collected under the spectral node ids given as arguments (all are,
    without any): it is one of them, lies under one, or has one under it."""
    if not arguments:
        return True
    return any(
        a == nodeid or nodeid.startswith(f"{a}::") or a.startswith(f"{nodeid}::") for a in arguments
    )


class SpectralItem(pytest.Item):
    """One (layer, head, matrix), or a whole (layer, matrix) when ``head`` is None.

    It computes nothing itself: it asks the run's engine, which batches per layer.
    """

    def __init__(self, *, layer: int, head: int | None, matrix: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.layer, self.head, self.matrix = layer, head, matrix
        self.record: Record | None = None
        #: the item warned although the warning filters make warnings errors (see _warn)
        self.warning_kept = False

    @property
    def scope(self) -> str:
        return "matrix" if self.head is None else "head"

    def runtest(self) -> None:
        run = self.config.stash[RUN_KEY]
        try:
            engine = run.engine()
            spectrum = (
                engine.whole(self.layer, self.matrix)
                if self.head is None
                else engine.head(self.layer, self.matrix, self.head)
            )
        except UnitError as exc:  # names its own tensor and cause
            raise SpectralCheckError(str(exc), self._tensor_location(run)) from None
        history = run.history
        stack, layer = run.checkpoint.position(self.layer)
        verdict = judge(
            run.rules.rules,
            layer,
            self.head,
            self.matrix,
            spectrum,
            stack=stack,
            baseline=run.baseline.for_item(self.nodeid) if run.baseline else None,
            trend=(lambda rule: history.reference(rule, self.nodeid)) if history else None,
            warn_only=run.warn_only,
        )
        kv_head, shape = run.item_place(self.layer, self.head, self.matrix)
        self.record = item_record(
            nodeid=self.nodeid,
            stack=stack,
            layer=layer,
            head=self.head,
            matrix=self.matrix,
            kv_head=kv_head,
            shape=shape,
            spectrum=spectrum,
            verdict=verdict,
        )
        self.user_properties.extend(spectrum.metrics.items())
        # --junitxml shows a warned item as passed: these properties tell them apart
        self.user_properties.append(("spectral_outcome", verdict.outcome))
        if verdict.outcome == "passed":
            return
        self.user_properties.append(("spectral_problem", _headline(self.record)))
        text = self._describe(run, spectrum, self.record)
        if verdict.outcome == "failed":
            raise SpectralCheckError(self._once_per_slice(text), self._location(run, verdict))
        self._warn(SpectralRuleWarning(printable(text, keep_newlines=True)), run, verdict)

    def _warn(self, warning: SpectralRuleWarning, run: SpectralRun, verdict: Verdict) -> None:
        """Issue the warning of a warned item, for pytest's warnings summary.

        Every item of a shared K/V slice warns with the same text and location, which the
        summary shows once, under the ids of all of them. The verdict is the rules file's
        (``severity = "warn"``, or ``--spectral-warn-only``): warning filters that make
        warnings errors (``-W error``, ``filterwarnings = ["error"]``) would otherwise turn a
        warned item into a failure with pytest's traceback, and a warn-only run into a
        failing one. The warning is then recorded as a warning all the same, and the item
        noted, so that the summary says the filters were not applied to it.
        """
        filename, lineno = self._location(run, verdict)
        try:
            warnings.warn_explicit(warning, SpectralRuleWarning, filename=filename, lineno=lineno)
        except SpectralRuleWarning:
            self.warning_kept = True
            with warnings.catch_warnings():
                warnings.simplefilter("always", SpectralRuleWarning)
                warnings.warn_explicit(
                    warning, SpectralRuleWarning, filename=filename, lineno=lineno
                )

    def _once_per_slice(self, text: str) -> str:
        """The full failure report, or a reference to the item of the same K/V slice that
        printed it: under grouped-query attention the K (or V) items of a group's query heads
        read one slice, and the same report four times over hides the other failures."""
        if self.head is None or self.matrix not in ("k", "v"):
            return text
        printed: dict[str, str] = self.parent.printed_reports  # type: ignore[union-attr]
        first = printed.setdefault(text, self.nodeid)
        if first == self.nodeid:
            return text
        headline, where = text.splitlines()[:2]
        return f"{headline}\n{where}\n  the same slice and verdict as {first}, reported above"

    def _tensor_location(self, run: SpectralRun) -> tuple[str, int]:
        """Where a failure to read or measure the item's tensor points: its weight file (a
        circuit's first factor's; no line: the file is binary)."""
        source = run.checkpoint.sources(self.layer, self.matrix)[0]
        return printable(str(source.file)), 0

    def _location(self, run: SpectralRun, verdict: Verdict) -> tuple[str, int]:
        """Where a warning or a failure points: the line of the bound the first broken rule
        set, in its rules file, or, for the built-in non-finite and zero checks, the function
        that makes them (whose first line Python prints for a warning).

        The rules file is named in angle brackets (``<rules.toml>:43``), like Python's
        ``<string>``: Python's warnings print the source line of a real file name, read from
        disk when the summary is printed, and a rules file is not trusted to reach the
        terminal raw (nor to stay unchanged until then).
        """
        broken = next((b for b in verdict.broken if b.rule.line() is not None), None)
        if broken is None or run.rules.path is None:
            code = builtin_checks.__code__
            return code.co_filename, code.co_firstlineno
        path = run.rules.path
        start = self.config.invocation_params.dir
        shown = path.relative_to(start) if path.is_relative_to(start) else path
        return f"<{printable(str(shown))}>", broken.rule.line(broken.bound or "")  # type: ignore[return-value]

    def _describe(self, run: SpectralRun, spectrum: HeadSpectrum, record: Record) -> str:
        lines = [_headline(record), self._where(run)]
        status = "WARN" if record["outcome"] == "warned" else "FAIL"  # --spectral-warn-only
        if record["status"] == "nonfinite":
            lines.append(
                f"  {status} non-finite weights: {counted(spectrum.nonfinite, 'NaN/Inf value')} "
                "in this slice (corrupt file or diverged training)"
            )
        elif record["status"] == "zero_matrix":
            lines.append(
                f"  {status} zero matrix: every weight of this slice is 0, ratios are undefined"
            )
        limited = bool(record["floor_limited"])
        for broken in record["broken_rules"]:  # type: ignore[attr-defined]
            severity = str(broken["severity"]).upper()
            lines.append(f"  {severity:4} {describe_broken(broken, floor_limited=limited)}")
        if record["status"] != "nonfinite":
            top = spectrum.singular_values[:_TOP_VALUES_SHOWN]
            shown = ", ".join(f"{v:.4g}" for v in top)
            lines.append(
                f"  top singular values ({len(top)} of {len(spectrum.singular_values)}): {shown}"
            )
        return "\n".join(lines)

    def _where(self, run: SpectralRun) -> str:
        """Where the slice lives. A K/V slice is named by its K/V head and the query heads
        sharing it, the same words for every item of the group."""
        g = run.checkpoint.geometry_at(self.layer)
        where = place(*run.checkpoint.position(self.layer))
        if self.matrix in CIRCUITS:
            return self._circuit_where(run)
        kind, expert = split_expert_item(self.matrix)
        if expert is not None:
            m, n = run.checkpoint.item_shape(self.matrix, whole=True, block=self.layer)
            location = run.checkpoint.experts[(self.layer, kind)].location(expert)
            part = kind.removeprefix("expert-")
            return f"{where}, expert {expert}, {part}: {location} ({m}x{n})"
        entry = run.checkpoint.tensors[(self.layer, self.matrix)]
        if self.head is None:
            m, n = run.checkpoint.item_shape(self.matrix, whole=True, block=self.layer)
            source = _whole_source(self.matrix, entry.name, run.checkpoint, self.layer)
            return f"{where}, whole {self.matrix}: {source} ({m}x{n})"
        shared = self.matrix in ("k", "v")
        index = g.kv_head_of(self.head) if shared else self.head
        axis, start, stop = slice_span(self.matrix, index, g, run.checkpoint.layout_at(self.layer))
        m, n = g.slice_shape(self.matrix)
        if shared and g.group_size > 1:
            first = index * g.group_size
            head = f"K/V head {index} (shared by query heads {first}-{first + g.group_size - 1})"
        elif shared:
            head = f"K/V head {index}"
        else:
            head = f"head {self.head}"
        return f"{where}, {head}, {self.matrix}: {axis} {start}:{stop} of {entry.name} ({m}x{n})"

    def _circuit_where(self, run: SpectralRun) -> str:
        """A circuit names its product and where each factor's slice lives."""
        g, layout = run.checkpoint.geometry_at(self.layer), run.checkpoint.layout_at(self.layer)
        head: int = self.head  # type: ignore[assignment]
        kv_head = g.kv_head_of(head)
        parts = []
        for factor in CIRCUITS[self.matrix]:
            index = kv_head if factor in ("k", "v") else head
            axis, start, stop = slice_span(factor, index, g, layout)
            name = run.checkpoint.tensors[(self.layer, factor)].name
            parts.append(f"{factor} {axis} {start}:{stop} of {name}")
        product = CIRCUIT_PRODUCTS[self.matrix]
        return (
            f"{place(*run.checkpoint.position(self.layer))}, head {head} (K/V head {kv_head}), "
            f"{self.matrix} = {product}: "
            f"{'; '.join(parts)} ({g.hidden}x{g.hidden}, rank <= {g.head_dim})"
        )

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: TracebackStyle | None = None,
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, SpectralCheckError):
            line_only = self.config.getoption("tbstyle", "auto") == "line"
            return failure_repr(excinfo.value, line_only=line_only)
        if not self.config.getoption("fulltrace", False):
            excinfo.traceback = _from_runtest(excinfo.traceback)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, None, str]:
        """The node id as the item's location: failure titles and ``-v`` lines then read like
        the ids that ``--lf``, ``--deselect`` and positional arguments take."""
        return self.config.rootpath / ROOT_NAME, None, self.nodeid


def _whole_source(matrix: str, name: str, checkpoint: Checkpoint, block: int) -> str:
    """A whole-matrix item's tensor as a failure names it: the tensor, its share of a fused
    one, or the rows of a latent down-projection."""
    rows = whole_rows(matrix, checkpoint.geometry_at(block))
    if rows is not None:
        return f"rows {rows[0]}:{rows[1]} of {name}"
    if tensor_key(checkpoint.layout_at(block).fused, matrix) != matrix:
        return f"{matrix.upper()}'s share of fused {name}"
    return name
