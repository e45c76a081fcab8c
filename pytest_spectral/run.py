"""The state of one spectral run: checkpoint, rules, selection, engine and gathered records.

Built once in ``pytest_configure`` (where errors become usage errors, exit code 4) and kept
in ``config.stash``. The engine, which imports torch, is created when the first item runs,
so ``--collect-only`` stays cheap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_spectral.checkpoints.checkpoint import (
    CIRCUITS,
    HEAD_MATRICES,
    Checkpoint,
    open_checkpoint,
)
from pytest_spectral.checkpoints.families import (
    ArchitectureError,
    Family,
    custom_family,
    matrix_kind,
)
from pytest_spectral.checkpoints.formats import ReadOptions
from pytest_spectral.checkpoints.hub import (
    cached_snapshot,
    describe_missing,
    hub_id_of,
    resolve_hub_model,
)
from pytest_spectral.compute.device import resolve_device, xdist_worker_index
from pytest_spectral.errors import CheckpointError, DeviceError
from pytest_spectral.invocation import (
    CHECKPOINT_DIRECTORY,
    protected_directories,
    refuse_collection_and_outputs_inside,
    refuse_configuration_inside,
)
from pytest_spectral.judging.metrics import (
    DEFAULT_REQUESTS,
    MetricRegistry,
    MetricRequest,
    MetricSpec,
    default_request,
)
from pytest_spectral.judging.ranges import IndexSet
from pytest_spectral.judging.rules import RulesError, RuleSet, hint, load_rules
from pytest_spectral.options import given_path, option_value, rules_path
from pytest_spectral.outputs import output_paths
from pytest_spectral.printable import printable
from pytest_spectral.reporting.step import Step, StepError, checkpoint_step, step_from_option
from pytest_spectral.untrusted import (
    MAX_INDEX_BYTES,
    MAX_TOML_BYTES,
    UntrustedFileError,
    load_json,
    load_toml,
)
from pytest_spectral.wording import counted, indices

if TYPE_CHECKING:
    from pytest_spectral.compute.engine import SpectraEngine
    from pytest_spectral.judging.baseline import Baseline
    from pytest_spectral.reporting.history.earlier import EarlierReports
    from pytest_spectral.results import LayerStats, Record


@dataclass
class SpectralRun:
    model_argument: str
    model_path: Path  # local: a hub id's snapshot, or the path as given
    checkpoint: Checkpoint
    #: directories holding the checkpoint's files (or a hub id's cache), never collected from
    protected: frozenset[Path]
    rules: RuleSet
    layers: list[int]
    #: matrices of head items, and of whole-matrix items (which add the MLP's)
    head_matrices: tuple[str, ...]
    whole_matrices: tuple[str, ...]
    #: "head", "matrix" or both (--spectral-scope)
    scopes: tuple[str, ...]
    energy: float
    report_path: Path | None
    device: str  # as requested; "auto" is resolved when something must be computed
    precision: str
    #: --spectral-threads; ``None``: this process's share of the usable cores, counted only
    #: when something must be computed (a re-run served from the cache never counts them)
    threads: int | None
    cache_dir: Path | None
    #: --spectral-subprocess: "auto", "on" or "off"
    subprocess: str = "auto"
    baseline: Baseline | None = None
    #: the checkpoint's place in a training run (--spectral-step, or what it says)
    step: Step | None = None
    #: the reports of earlier checkpoints (--spectral-history)
    history: EarlierReports | None = None
    warn_only: bool = False
    calibrate_path: Path | None = None
    calibrate_margin: float = 0.25
    #: the metric of --spectral-heatmap
    heatmap: MetricSpec | None = None
    html_path: Path | None = None
    #: metrics added through pytest_spectral_register_metrics, recorded for every item
    user_requests: tuple[MetricRequest, ...] = ()
    #: spectral node ids given as arguments (``spectral::layer01``); empty: every item
    selected: tuple[str, ...] = ()
    #: (layer, matrix, scope) of the items this process will run, in order
    needed: list[tuple[int, str, str]] = field(default_factory=list)
    records: dict[str, Record] = field(default_factory=dict)
    on_layer: Callable[[LayerStats], None] | None = None
    _engine: SpectraEngine | None = None

    @classmethod
    def from_config(cls, config: pytest.Config) -> SpectralRun:
        """Validate every option and open the checkpoint; raises ``pytest.UsageError`` with a
        precise message. Output paths were checked, and earlier runs' files there removed, at
        ``pytest_load_initial_conftests`` (``outputs.py``), so that none of these errors can
        leave a stale report behind."""
        model_argument: str = config.getoption("spectral_model")
        scope = option_value(config, "spectral_scope")
        precision = option_value(config, "spectral_dtype")
        energy = option_value(config, "spectral_energy")
        threads = option_value(config, "spectral_threads")
        margin = option_value(config, "spectral_calibrate_margin")
        selection = option_value(config, "spectral_layers") or IndexSet.everything()
        try:
            model_path = local_model_path(config)
            _refuse_json_file(model_path, model_argument)
            options = ReadOptions(
                config=given_path(config, "spectral_config"),
                base_model=_base_model_path(config),
                adapter=str(option_value(config, "spectral_adapter")),
            )
            try:
                checkpoint = open_checkpoint(
                    model_path,
                    options=options,
                    family=_custom_family(config),
                    vision=config.getoption("spectral_vision"),
                )
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}{_shard_hint(model_path)}") from None
            protected = {
                **protected_directories(
                    model_argument, config.getoption("spectral_base_model")
                ),
                **dict.fromkeys(checkpoint_directories(checkpoint), CHECKPOINT_DIRECTORY),
            }
            # again: a hub snapshot's directories, and a LoRA adapter's base model's, are known
            # only now
            refuse_configuration_inside(config, protected)
            refuse_collection_and_outputs_inside(config, protected)
            metrics = MetricRegistry()
            config.hook.pytest_spectral_register_metrics(metrics=metrics)
            rules_file = rules_path(config)
            rules = load_rules(rules_file, metrics.specs) if rules_file else RuleSet.empty()
            device = config.getoption("spectral_device").strip().lower()
            if device not in ("auto", "cpu"):
                device = resolve_device(device, precision)  # fail now, not at the first item
            baseline = _baseline(config, checkpoint, rules)
            step = _step(config, checkpoint)
            heatmap = _heatmap_metric(config, metrics)
            outputs = output_paths(config)
            if "spectral_html" in outputs:
                from pytest_spectral.reporting.html_report import require_matplotlib

                require_matplotlib()
        except (
            CheckpointError,
            RulesError,
            DeviceError,
            ArchitectureError,
            StepError,
            ImportError,
        ) as exc:
            raise pytest.UsageError(printable(str(exc))) from None
        selected = _selected_matrices(config, checkpoint, scope)
        if scope == "head" and not set(selected) & set(HEAD_MATRICES):
            whole = "they exist only as whole matrices" if len(selected) > 1 else (
                "it exists only as a whole matrix"
            )
            raise pytest.UsageError(
                f"--spectral-matrices {','.join(selected)}: no head item to collect: {whole}; "
                "add --spectral-scope matrix (or both)"
            )
        counts = checkpoint.stack_layers()
        if missing := selection.beyond(max(counts.values())):
            raise pytest.UsageError(
                f"--spectral-layers {selection.spec}: layer(s) {missing.spec} do not exist; "
                f"{layer_counts(counts)}"
            )
        layers = [
            block
            for block in checkpoint.layer_numbers
            if checkpoint.position(block)[1] in selection
        ]
        if not layers:
            raise pytest.UsageError(
                f"--spectral-layers {selection.spec}: the update covers only layers "
                f"{', '.join(map(str, checkpoint.layer_numbers))}"
            )
        try:
            history = _history(config, checkpoint, rules, step, outputs.get("spectral_report"))
        except RulesError as exc:
            raise pytest.UsageError(printable(str(exc))) from None
        run = cls(
            model_argument=model_argument,
            model_path=model_path,
            checkpoint=checkpoint,
            protected=frozenset(protected),
            rules=rules,
            layers=layers,
            head_matrices=tuple(m for m in selected if m in HEAD_MATRICES),
            whole_matrices=tuple(m for m in selected if m not in CIRCUITS),
            scopes=("head", "matrix") if scope == "both" else (scope,),
            energy=energy,
            report_path=outputs.get("spectral_report"),
            user_requests=metrics.user_requests(),
            device=device,
            precision=precision,
            threads=threads,
            subprocess=option_value(config, "spectral_subprocess"),
            cache_dir=_cache_dir(config),
            baseline=baseline,
            step=step,
            history=history,
            warn_only=config.getoption("spectral_warn_only"),
            calibrate_path=outputs.get("spectral_calibrate"),
            calibrate_margin=margin,
            heatmap=heatmap,
            html_path=outputs.get("spectral_html"),
        )
        run.check_nothing_missing()
        run.check_readable()
        return run

    def check_nothing_missing(self) -> None:
        """Refuse a run that would collect no item at all (``--spectral-layers 0
        --spectral-matrices expert-gate`` on a dense layer 0), saying why for each matrix."""
        if "head" in self.scopes and self.head_matrices:
            return
        if any(self.layers_with(matrix, self.layers) for matrix in self.whole_matrices):
            return
        reasons = "; ".join(
            f"{matrix}: {self.why_absent(matrix, self.layers)}" for matrix in self.whole_matrices
        )
        raise pytest.UsageError(
            printable(
                f"--spectral-matrices {','.join(self.whole_matrices)}: no item to collect "
                f"({reasons})"
            )
        )

    def layers_with(self, matrix: str, blocks: list[int]) -> list[int]:
        """Those of ``blocks`` that have the whole ``matrix`` (a kind: ``expert-gate``): the
        dense and sparse layers of a mixture of experts have different matrices."""
        return [block for block in blocks if (block, matrix) in self.checkpoint.tensors]

    def why_absent(self, matrix: str, blocks: list[int]) -> str:
        """Why ``blocks`` (none of which has ``matrix``) have no ``matrix`` item, with the
        layers that do: ``layer 0 is dense; the layers with expert-gate: 1``."""
        named = ", ".join(self._layer_name(block) for block in blocks)
        word = "layer" if len(blocks) == 1 else "layers"
        sparse = {layer for layer, _ in self.checkpoint.experts}
        kind = ""
        if sparse and all(block in sparse for block in blocks):
            kind = f"{word} {named} {'is' if len(blocks) == 1 else 'are'} sparse"
        elif sparse and not any(block in sparse for block in blocks):
            kind = f"{word} {named} {'is' if len(blocks) == 1 else 'are'} dense"
        having = self.layers_with(matrix, list(self.checkpoint.layer_numbers))
        if not having:
            return f"{kind or word + ' ' + named}: the checkpoint has no {matrix}"
        others = ", ".join(self._layer_name(block) for block in having)
        return f"{kind or word + ' ' + named + ' have none'}; the layers with {matrix}: {others}"

    def _layer_name(self, block: int) -> str:
        stack, layer = self.checkpoint.position(block)
        return str(layer) if stack is None else f"{stack} {layer}"

    def check_readable(self) -> None:
        """Refuse now, naming the tensor, anything the selected items could not read."""
        matrices = {
            matrix
            for scope in self.scopes
            for matrix in (self.whole_matrices if scope == "matrix" else self.head_matrices)
        }
        try:
            needed = (
                (layer, matrix)
                for layer in self.layers
                for matrix in matrices
                # a layer's own matrices: dense and sparse layers differ, a cross-attention
                # block has no MLP
                if (layer, matrix) in self.checkpoint.tensors
            )
            self.checkpoint.check_readable(needed)
        except CheckpointError as exc:
            raise pytest.UsageError(printable(str(exc))) from None

    def item_place(
        self, block: int, head: int | None, matrix: str
    ) -> tuple[int | None, tuple[int, int]]:
        """``(kv_head, shape)`` of an item of ``block``: the K/V head a k, v, qk or ov head
        item reads (``None`` otherwise, and for whole matrices), and its matrix's ``[m, n]``."""
        geometry = self.checkpoint.geometry_at(block)
        shared = head is not None and matrix in ("k", "v", *CIRCUITS)
        kv_head = geometry.kv_head_of(head) if shared else None  # type: ignore[arg-type]
        return kv_head, self.checkpoint.item_shape(matrix, whole=head is None, block=block)

    @property
    def from_hub(self) -> bool:
        """Whether the model argument was a hub id (its local path is a cache snapshot)."""
        return self.model_path != Path(self.model_argument).expanduser()

    @property
    def rank_request(self) -> MetricRequest:
        """The energy rank that suggests a candidate's factorisation rank."""
        return default_request("energy_rank", p=self.energy)

    def requests(self) -> tuple[MetricRequest, ...]:
        """Metrics every item records: the defaults, the rules' variants and the rank."""
        return tuple(
            dict.fromkeys(
                (*DEFAULT_REQUESTS, *self.user_requests, *self.rules.requests(), self.rank_request)
            )
        )

    def engine(self) -> SpectraEngine:
        """The engine, created on first use (so collection alone never computes)."""
        if self._engine is None:
            from pytest_spectral.compute.cache import SpectraCache
            from pytest_spectral.compute.engine import SpectraEngine

            # Workers of pytest-xdist already fill the cores; prefetching would compete.
            single = xdist_worker_index() is None
            self._engine = SpectraEngine(
                self.checkpoint,
                self.requests(),
                device=self.device,
                precision=self.precision,
                threads=self.threads,
                cache=SpectraCache(self.cache_dir) if self.cache_dir else None,
                prefetch=single,
                isolate=self._isolate(single),
                on_layer=self.on_layer,
            )
            self._engine.plan(self.needed)
        return self._engine

    def _isolate(self, single: bool) -> bool:
        """Whether to decompose in a child process (--spectral-subprocess): "auto" does in a
        single process reading at least :data:`ISOLATE_FROM_WEIGHTS` weights."""
        if self.subprocess != "auto":
            return self.subprocess == "on"
        return single and self._planned_weights() >= ISOLATE_FROM_WEIGHTS

    def _planned_weights(self) -> int:
        """How many weights the tensors of the items this process runs hold."""
        sources = {
            source.key: math.prod(source.shape)
            for layer, matrix, _ in self.needed
            for source in self.checkpoint.sources(layer, matrix_kind(matrix))
        }
        return sum(sources.values())

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def settings(self) -> dict[str, object]:
        """The options that shaped the run, for the report: ``layers`` are the layers'
        numbers, per stack in an encoder-decoder model (``{"encoder": [0, 1], ...}``); with a
        vision tower, the text model's under ``"text"`` beside ``"vision"``."""
        positions = [self.checkpoint.position(block) for block in self.layers]
        layers: object = [layer for _, layer in positions]
        if self.checkpoint.stacks:
            layers = {
                stack or "text": [layer for named, layer in positions if named == stack]
                for stack in self.checkpoint.stack_layers()
            }
        return {
            "layers": layers,
            "scopes": list(self.scopes),
            "matrices": list(
                dict.fromkeys(
                    m
                    for scope in self.scopes
                    for m in (self.whole_matrices if scope == "matrix" else self.head_matrices)
                )
            ),
            "candidate_energy": self.energy,
            "precision": self.precision,
            "device": self.device,
            "warn_only": self.warn_only,
        }


def layer_counts(
    counts: Mapping[str | None, int], among: Mapping[str | None, int] | None = None
) -> str:
    """``the model has 4 layers (0-3)``, or each stack's count in an encoder-decoder model:
    ``the encoder stack has 2 layers (0-1), the decoder stack has 3 layers (0-2), ...``; beside
    a vision stack (in ``among``, the checkpoint's stacks, by default ``counts``), the layers
    in no stack are the text model's."""
    return ", ".join(
        f"{_owner(stack, among or counts)} has {counted(n, 'layer')} ({indices(n)})"
        for stack, n in counts.items()
    )


def head_counts(checkpoint: Checkpoint, stacks: Iterable[str | None]) -> str:
    """``the model has 4 query heads (0-3)``, or each of ``stacks``' count where a stack has
    heads of its own: ``the text model has 4 query heads (0-3), the vision stack has 3 ...``."""
    geometries = checkpoint.stack_geometries()
    chosen = {stack: geometries[stack].heads for stack in stacks if stack in geometries}
    if not checkpoint.own_geometries():  # one head layout: the model's
        heads = checkpoint.geometry.heads
        return f"the model has {counted(heads, 'query head')} ({indices(heads)})"
    return ", ".join(
        f"{_owner(stack, geometries)} has {counted(n, 'query head')} ({indices(n)})"
        for stack, n in chosen.items()
    )


def _owner(stack: str | None, counts: Mapping[str | None, object]) -> str:
    if stack is not None:
        return f"the {stack} stack"
    return "the model" if len(counts) == 1 else "the text model"


def checkpoint_directories(checkpoint: Checkpoint) -> set[Path]:
    """Resolved directories holding the checkpoint's files: its root, the directories its
    weight files are named in (a LoRA adapter's base model's too) and wherever they really are
    (a hub snapshot's blobs, a symlinked shard's target)."""
    files = checkpoint.files
    return {
        checkpoint.root.resolve(),
        *(f.parent.resolve() for f in files),
        *(f.resolve().parent for f in files),
    }


def local_model_path(config: pytest.Config) -> Path:
    """Where the checkpoint is on disk: a path as given, or a hub id's snapshot.

    pytest-xdist workers receive the controller's answer, so a hub id is resolved once.
    """
    worker_input = getattr(config, "workerinput", {})
    if MODEL_PATH_KEY in worker_input:
        return Path(worker_input[MODEL_PATH_KEY])
    argument: str = config.getoption("spectral_model")
    repo_id = hub_id_of(argument)
    if repo_id is not None:
        return resolve_hub_model(repo_id, config.getoption("spectral_revision"))
    path = Path(os.path.expanduser(argument))
    if not os.path.lexists(path):
        raise CheckpointError(describe_missing(argument))
    return path


def _base_model_path(config: pytest.Config) -> Path | None:
    """``--spectral-base-model`` as a local path: a hub id is resolved by the controller, and
    found in the cache by pytest-xdist workers."""
    argument: str | None = config.getoption("spectral_base_model")
    if argument is None:
        return None
    repo_id = hub_id_of(argument)
    if repo_id is None:
        path = Path(os.path.expanduser(argument))
        if not os.path.lexists(path):
            raise CheckpointError(f"--spectral-base-model {describe_missing(argument)}")
        return path.absolute()
    if hasattr(config, "workerinput"):
        cached = cached_snapshot(repo_id)
        if cached is not None:
            return cached
    return resolve_hub_model(repo_id, None)


def _refuse_json_file(path: Path, argument: str) -> None:
    """A JSON file (``config.json``, an index, ``params.json``, ``adapter_config.json``) named
    instead of its checkpoint's directory is a usage error saying what to pass instead, rather
    than an error about its first bytes as a weight file."""
    if not path.is_file() or path.suffix != ".json":
        return
    directory = Path(argument).parent
    raise CheckpointError(
        f"{argument}: a JSON file (a config or index file), not a checkpoint; pass the "
        f"checkpoint's directory: --spectral-model={directory}, or a single weight file "
        "(.safetensors, .gguf, a torch checkpoint)"
    )


#: index files that list the shards of a checkpoint directory
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _shard_hint(path: Path) -> str:
    """``; x is one shard of ...: pass the directory`` when the weight file ``path`` is listed
    by an index beside it (a single shard lacks the other shards' tensors), else nothing."""
    if path.is_dir():
        return ""
    for name in _INDEXES:
        index = path.parent / name
        if not index.exists():
            continue
        try:
            document = load_json(index, MAX_INDEX_BYTES, "weight index")
        except UntrustedFileError:
            continue
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        files = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        if path.name in files:
            return (
                f"; {path.name} is one of the {len(files)} shards that {index} lists: pass "
                f"the checkpoint's directory: --spectral-model={path.parent}"
            )
    return ""


def _custom_family(config: pytest.Config) -> Family | None:
    path = given_path(config, "spectral_architecture")
    if path is None:
        return None
    try:
        table, _, _ = load_toml(path, MAX_TOML_BYTES, "architecture description")
    except UntrustedFileError as exc:
        raise ArchitectureError(str(exc)) from None
    if not isinstance(table.get("architecture"), dict):
        raise ArchitectureError(f"{path}: needs an [architecture] table (see the README)")
    return custom_family(table["architecture"], str(path))


def _selected_matrices(
    config: pytest.Config, checkpoint: Checkpoint, scope: str
) -> tuple[str, ...]:
    """--spectral-matrices, or every matrix the checkpoint has; MLP ones only exist whole,
    the QK and OV circuits only per head, and only when named (they cost a QR per slice)."""
    available = checkpoint.attention + checkpoint.circuits + checkpoint.mlp
    chosen = option_value(config, "spectral_matrices")
    if chosen is None:
        return checkpoint.attention + checkpoint.mlp
    refused = [m for m in chosen if m in CIRCUITS and m not in available]
    if refused and checkpoint.circuit_refusal is not None:
        raise pytest.UsageError(
            f"--spectral-matrices {','.join(refused)}: {checkpoint.circuit_refusal}"
        )
    missing = [m for m in chosen if m not in available]
    if missing:
        towers = [m for m in missing if m in checkpoint.unread_tower]
        tower = (
            f"; {', '.join(towers)} {'is' if len(towers) == 1 else 'are'} the vision tower's, "
            "collected with --spectral-vision"
            if towers
            else ""
        )
        raise pytest.UsageError(
            f"--spectral-matrices: this checkpoint has no {', '.join(missing)} "
            f"(it has {', '.join(available)}){tower}"
        )
    circuits = [m for m in chosen if m in CIRCUITS]
    if circuits and scope == "matrix":
        raise pytest.UsageError(
            f"--spectral-matrices {','.join(circuits)}: circuits exist per head only; "
            "use --spectral-scope head (the default) or both"
        )
    return chosen


def _baseline(config: pytest.Config, checkpoint: Checkpoint, rules: RuleSet) -> Baseline | None:
    """The report of --spectral-baseline; a relative rule without one is a usage error. Its
    reader is imported only when one is given, as the history's is."""
    path = given_path(config, "spectral_baseline")
    if path is None:
        relative = next((r for r in rules.rules if r.is_relative and not r.is_trend), None)
        if relative is not None:
            raise RulesError(
                f"{rules.path}: rule {relative.name!r} bounds the change against a baseline; "
                "give one with --spectral-baseline=REPORT.json (a --spectral-report of a "
                "known-good run)"
            )
        return None
    from pytest_spectral.judging.baseline import BaselineError, load_baseline

    compared = (rule.request for rule in rules.rules if rule.is_relative and not rule.is_trend)
    try:
        return load_baseline(path, checkpoint, compared)
    except BaselineError as exc:
        raise pytest.UsageError(printable(str(exc))) from None


def _step(config: pytest.Config, checkpoint: Checkpoint) -> Step | None:
    option = config.getoption("spectral_step")
    if option is not None:
        return step_from_option(option)
    return checkpoint_step(checkpoint.root) if checkpoint.root.is_dir() else None


def _history(
    config: pytest.Config,
    checkpoint: Checkpoint,
    rules: RuleSet,
    step: Step | None,
    own_report: Path | None,
) -> EarlierReports | None:
    """The earlier reports of --spectral-history, holding what trend rules and the HTML
    report's history need; a trend rule without them is a usage error."""
    paths = config.getoption("spectral_history")
    trend = [r for r in rules.rules if r.is_trend]
    if not paths:
        if trend:
            raise RulesError(
                f"{rules.path}: rule {trend[0].name!r} bounds the change over the last "
                f"{trend[0].window} reports; give the reports of earlier checkpoints with "
                "--spectral-history=DIR (an empty directory for the first checkpoint)"
            )
        return None
    from pytest_spectral.reporting.history.earlier import load_earlier
    from pytest_spectral.reporting.history.page import history_metrics
    from pytest_spectral.reporting.history.reports import HistoryError

    g = checkpoint.geometry
    try:
        return load_earlier(
            [Path(os.path.expanduser(p)).absolute() for p in paths],
            step=step,
            layout=(checkpoint.model_type, g.layers, g.heads, g.kv_heads, g.head_dim, g.hidden),
            stack_geometry=checkpoint.own_geometries(),
            keys=history_metrics([], rules.rules),
            own_report=own_report,
        )
    except HistoryError as exc:
        raise pytest.UsageError(printable(str(exc))) from None


def _heatmap_metric(config: pytest.Config, metrics: MetricRegistry) -> MetricSpec | None:
    metric = config.getoption("spectral_heatmap")
    if metric is None:
        return None
    if metric not in metrics.specs:
        known = metrics.specs
        raise RulesError(f"--spectral-heatmap: unknown metric {metric!r}{hint(metric, known)}")
    return metrics.specs[metric]


def _cache_dir(config: pytest.Config) -> Path | None:
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    if cache is None or config.getoption("spectral_no_cache"):
        return None
    return cache.mkdir("spectral")


#: key of the resolved checkpoint path in pytest-xdist's workerinput
#: Where --spectral-subprocess=auto starts a child: below it, the child's start-up (importing
#: torch) cost about what it saved (measured: README, Speed).
ISOLATE_FROM_WEIGHTS = 2**28

MODEL_PATH_KEY = "spectral_model_path"
RUN_KEY = pytest.StashKey[SpectralRun]()
