"""What a run accepts without a word otherwise, each said in one line of the header.

A run that quietly does less than its options and rules ask for is worse than one that fails:
the user reads "passed" and believes the rules were applied. Each notice names what is not
used and what to change: the user's tests left out, a layout assumed for an undeclared
model_type, whole-matrix items without the MLP, no rules (or a file without any), a baseline
no rule compares with, a rule that applies to no item of the run, a ``--spectral-matrices``
entry without items, ``--spectral-config`` used instead of a checkpoint's own
``config.json``, warn-only mode, and the earlier reports of ``--spectral-history``.

Rules and matrices are checked against what the options select (``--spectral-scope``,
``--spectral-layers``, ``--spectral-matrices``, the model's layers and heads), not against
``-k`` or ``--deselect``, which leave items out on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from pytest_spectral.checkpoints.checkpoint import CIRCUITS, HEAD_MATRICES
from pytest_spectral.checkpoints.families import (
    MLP_MATRICES,
    RULE_STACK_NAMES,
    TEXT,
    VISION,
    WHOLE_ONLY_MATRICES,
    matrix_kind,
)
from pytest_spectral.judging.ranges import IndexSet
from pytest_spectral.judging.rules import Rule
from pytest_spectral.options import option_value
from pytest_spectral.printable import printable
from pytest_spectral.run import SpectralRun, head_counts, layer_counts
from pytest_spectral.selection import collection_notice


def notices(run: SpectralRun, config: pytest.Config) -> list[str]:
    """Every notice of the run, in the order the header shows them."""
    lines = []
    if (collection := collection_notice(config)) is not None:
        lines.append(collection)
    if run.warn_only:
        lines.append(
            "spectral: --spectral-warn-only: every broken rule, non-finite or all-zero slice is "
            "reported as a warning; no item fails (exit code 0)"
        )
    if (config_used := _config_notice(run, config)) is not None:
        lines.append(config_used)
    lines.extend(run.checkpoint.notes)
    if run.checkpoint.unread_tower:
        lines.append(
            f"spectral: the vision tower of this {run.checkpoint.wrapper} model is not "
            "analysed, only its text model; --spectral-vision adds it (spectral::vision::...)"
        )
    if "matrix" in run.scopes and not run.checkpoint.mlp:
        custom = run.checkpoint.layout.family == "custom"
        lines.append(
            "spectral: matrix scope analyses attention only: "
            + (
                "the --spectral-architecture file names no MLP tensors (add mlp_layer and "
                "gate, up, gate_up, down, fc1 or fc2 keys to include them)"
                if custom
                else "the checkpoint has no MLP weights where a "
                f"{run.checkpoint.model_type} model keeps them, so only the attention matrices "
                "have items"
            )
        )
    rules = run.rules
    if rules.path is None:
        lines.append(
            "spectral: no rules file (--spectral-thresholds): items fail only for non-finite "
            "or all-zero weights; every metric is recorded"
        )
    elif not rules.rules:
        lines.append(
            f"spectral: {rules.path} has no [[rules]]: items fail only for non-finite or "
            "all-zero weights; every metric is recorded"
        )
    chosen = option_value(config, "spectral_matrices")
    lines += matrices_without_items(run, chosen)  # type: ignore[arg-type]
    lines += [
        f"spectral: rule {rule.name!r} ({rules.path}:{rule.line()}) applies to no item of this "
        f"run: {why}"
        for rule in rules.rules
        if (why := why_unused(rule, run)) is not None
    ]
    if run.baseline is not None and not any(r.is_relative and not r.is_trend for r in rules.rules):
        trend = " without a window (rules with one compare with --spectral-history)"
        lines.append(
            f"spectral: --spectral-baseline {run.baseline.path} is not used: no rule has "
            f"min_change or max_change{trend if any(r.is_trend for r in rules.rules) else ''}"
        )
    if run.baseline is not None and run.baseline.computed:
        keys = ", ".join(run.baseline.computed)
        lines.append(
            f"spectral: --spectral-baseline {run.baseline.path} has no {keys}: computed from "
            "the singular values it stores"
        )
    if run.history is not None:
        labels = run.history.table.labels
        span = f" (steps {labels[0]} to {labels[-1]})" if labels else ""
        lines.append(f"spectral: history of {len(labels)} earlier report(s){span}")
    return [printable(line) for line in lines]


def _config_notice(run: SpectralRun, config: pytest.Config) -> str | None:
    """``--spectral-config`` given for a checkpoint that has its own ``config.json``."""
    option = config.getoption("spectral_config")
    if option is None:
        return None
    own = (run.model_path if run.model_path.is_dir() else run.model_path.parent) / "config.json"
    if not own.exists() or own.resolve() == Path(option).expanduser().resolve():
        return None
    return (
        f"spectral: --spectral-config {option} is used; the checkpoint's own {own} is not read"
    )


def matrices_without_items(run: SpectralRun, chosen: tuple[str, ...] | None) -> list[str]:
    """A line for each matrix named by ``--spectral-matrices`` that has no item in the run's
    scopes: a whole-matrix-only one (the MLP's, multi-head latent attention's q_a, kv_a,
    k_rope) in a head-scope run, or one the selected layers do not have (an expert matrix in
    a mixture of experts' dense layer)."""
    if chosen is None:
        return []
    lines = []
    for matrix in chosen:
        if "head" in run.scopes and matrix in run.head_matrices:
            continue
        if "matrix" not in run.scopes or matrix not in run.whole_matrices:
            lines.append(
                f"spectral: --spectral-matrices: {matrix} has no item in this run: it exists "
                "only as a whole matrix; add --spectral-scope both (or matrix) to check it"
            )
        elif not run.layers_with(matrix, run.layers):
            lines.append(
                f"spectral: --spectral-matrices: {matrix} has no item in this run: "
                f"{run.why_absent(matrix, run.layers)}"
            )
    return lines


def why_unused(rule: Rule, run: SpectralRun) -> str | None:
    """Why ``rule`` applies to no item the run's options select, with what to change; ``None``
    when it applies to some."""
    if rule.scope not in run.scopes:
        if rule.scope == "head":
            return (
                'it judges head items (scope = "head", the default) and this run collects whole '
                'matrices only (--spectral-scope matrix): run with --spectral-scope both, or '
                'give the rule scope = "matrix"'
            )
        return (
            'it judges whole matrices (scope = "matrix") and this run collects head items only: '
            "run with --spectral-scope matrix or both"
        )
    stacks = run.checkpoint.stacks
    if rule.stacks == {VISION} and VISION not in run.checkpoint.stack_layers():
        wrapper = run.checkpoint.wrapper is not None
        return (
            "its stack (vision) is a multimodal model's vision tower, "
            + (
                "collected with --spectral-vision"
                if wrapper
                else "and this model has none: remove stacks"
            )
        )
    present_stacks = run.checkpoint.stack_layers()
    present = {stack or TEXT for stack in present_stacks}  # as a rule's stacks name them
    if rule.stacks is not None and stacks and not rule.stacks & present:
        return (
            f"its stacks ({_rule_stacks(rule)}) do not "
            f"exist in this run, whose layers are {_stack_names(present_stacks)}"
        )
    if rule.stacks is not None and not rule.stacks & present:
        return (
            f"its stacks ({_rule_stacks(rule)}) are those of an encoder-decoder model, and "
            'this model\'s layers are not in stacks: remove stacks (or give stacks = ["text"])'
        )
    collected = run.head_matrices if rule.scope == "head" else run.whole_matrices
    if not rule.matrices & set(collected):
        named = _names(rule.matrices)
        if rule.scope == "head" and rule.matrices <= set(WHOLE_ONLY_MATRICES):
            return (
                f"its matrices ({named}) exist only as whole matrices: give it "
                'scope = "matrix" and run with --spectral-scope matrix or both'
            )
        if rule.scope == "matrix" and rule.matrices <= set(CIRCUITS):
            return (
                f"its circuits ({named}) exist per head only: give it scope = \"head\""
            )
        checkpoint = run.checkpoint
        circuits = checkpoint.circuits if rule.scope == "head" else ()
        present = checkpoint.attention + circuits + checkpoint.mlp
        if not rule.matrices & set(present):
            return f"the checkpoint has no {named} (it has {', '.join(present)})"
        if rule.scope == "head" and rule.matrices <= set(CIRCUITS):
            return (
                f"its circuits ({named}) are collected only when --spectral-matrices names "
                "them"
            )
        return f"--spectral-matrices {','.join(collected)} leaves out its {named}"
    judged = {  # the layers (per stack) the rule may judge, and those the run collects
        stack: count
        for stack, count in run.checkpoint.stack_layers().items()
        if rule.stacks is None or (stack or TEXT) in rule.stacks
    }
    positions = [run.checkpoint.position(block) for block in run.layers]
    selected = [layer for stack, layer in positions if stack in judged]
    if not any(layer in rule.layers for layer in selected):
        existing = sorted(
            {layer for count in judged.values() for layer in range(count) if layer in rule.layers}
        )
        if not existing:
            return f"its layers {rule.layers.spec} do not exist: {layer_counts(judged)}"
        return (
            f"--spectral-layers {_spec(sorted(set(selected)))} leaves out its layers "
            f"{_spec(existing)}"
        )
    if rule.scope == "matrix":
        blocks = [
            block
            for block, (stack, layer) in zip(run.layers, positions, strict=True)
            if stack in judged and layer in rule.layers
        ]
        wanted = [matrix for matrix in collected if matrix in rule.matrices]
        if not any(run.checkpoint.layer_matrices(block, wanted) for block in blocks):
            return _absent_from_layers(rule, run, blocks)
    heads = max(  # the most query heads of a stack the rule judges
        (g.heads for stack, g in run.checkpoint.stack_geometries().items() if stack in judged),
        default=0,
    )
    if rule.scope == "head" and not any(head in rule.heads for head in range(heads)):
        return f"its heads {rule.heads.spec} do not exist: {head_counts(run.checkpoint, judged)}"
    return None


def _rule_stacks(rule: Rule) -> str:
    """``encoder, cross``: a rule's stacks, in the order a rules file documents them."""
    return ", ".join(sorted(rule.stacks or (), key=RULE_STACK_NAMES.index))


def _stack_names(counts: Mapping[str | None, int]) -> str:
    """``the text model's (stacks = ["text"]) and the vision stack's``."""
    return " and ".join(
        'the text model\'s (stacks = ["text"])' if stack is None else f"the {stack} stack's"
        for stack in counts
    )


def _absent_from_layers(rule: Rule, run: SpectralRun, blocks: list[int]) -> str:
    """Why a whole-matrix rule whose matrices the checkpoint has judges none of the layers it
    selects: those layers lack them (a cross-attention layer has no MLP of its own, a mixture
    of experts' dense layers have no experts)."""
    checkpoint = run.checkpoint
    kinds = checkpoint.attention + checkpoint.mlp
    present = {
        matrix_kind(name) for block in blocks for name in checkpoint.layer_matrices(block, kinds)
    }
    named = _names(rule.matrices)
    where = "the layers it judges"
    if rule.stacks is not None:
        stacks = sorted(rule.stacks, key=RULE_STACK_NAMES.index)
        owner = "stacks'" if len(stacks) > 1 else "stack's"
        where = f"the {' and '.join(stacks)} {owner} layers"
    why = f"{where} have no {named} (they have {', '.join(k for k in kinds if k in present)})"
    if rule.stacks == {"cross"} and rule.matrices <= set(MLP_MATRICES):
        why += (
            ": cross-attention has no MLP of its own; the MLP after it is the decoder "
            'stack\'s: give the rule stacks = ["decoder"]'
        )
    elif checkpoint.experts:  # a mixture of experts' dense and sparse layers differ
        elsewhere = [m for m in sorted(rule.matrices) if run.layers_with(m, run.layers)]
        why += "".join(f": {run.why_absent(m, blocks)}" for m in elsewhere)
    return why


def _names(matrices: frozenset[str]) -> str:
    order = HEAD_MATRICES + WHOLE_ONLY_MATRICES
    return ", ".join(sorted(matrices, key=order.index))


def _spec(indices: list[int]) -> str:
    return IndexSet.of([(i, i) for i in indices]).spec
