"""What a spectral run collects: spectral node ids given as arguments, and the user's tests.

pytest reads every positional argument as a path, so ``pytest --spectral-model=X
spectral::layer01::head02-q`` would fail with "file or directory not found: spectral::...".
The spectral ids are taken out of ``config.args`` before collection and select the items
themselves, like a file's node id would.

Without any path argument, pytest would collect its ``testpaths`` (or the invocation
directory); a spectral run collects only the spectral items then, and says so in the header,
with the command that runs the user's tests too.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pytest_spectral.checkpoints.checkpoint import CIRCUITS, HEAD_MATRICES, MATRICES
from pytest_spectral.checkpoints.families import (
    STACK_NAMES,
    STACKS,
    VISION,
    WHOLE_ONLY_MATRICES,
    split_expert_item,
)
from pytest_spectral.nodes import ROOT_NAME, layer_names, spectral_ids
from pytest_spectral.printable import printable
from pytest_spectral.run import SpectralRun, head_counts, layer_counts
from pytest_spectral.wording import counted, indices


def take_spectral_arguments(config: pytest.Config) -> tuple[str, ...]:
    """Remove the arguments that are spectral node ids from ``config.args`` and return them.

    An argument is one when its path part is ``spectral`` and no such file or directory
    exists where pytest would look for it (the invocation directory).
    """
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        return ()
    start = config.invocation_params.dir
    taken = tuple(a for a in config.args if _is_spectral_id(a, start))
    if taken:
        config.args = [a for a in config.args if a not in taken]
    return taken


def _is_spectral_id(argument: str, start: Path) -> bool:
    path = argument.partition("::")[0]
    return path == ROOT_NAME and not (start / path).exists()


def check_selection(run: SpectralRun) -> None:
    """Raise ``pytest.UsageError`` for a spectral id given as an argument that names nothing
    this run would collect (a layer or head the model lacks, a matrix left out, a typo)."""
    if not run.selected:
        return
    ids = list(spectral_ids(run))
    known = set(ids)
    for argument in run.selected:
        if argument not in known:
            unstacked = None in run.checkpoint.stack_layers()
            depth, parts = (2, "layer") if unstacked else (3, "stack, layer")
            first = next((i for i in ids if i.count("::") == depth), ROOT_NAME)
            why = why_not_collected(argument, run)
            raise pytest.UsageError(
                printable(
                    f"{argument}: no such spectral item in this run{': ' + why if why else ''}; "
                    f"ids look like {first} ({parts}, then head and matrix, zero-padded; see "
                    "--collect-only -q)"
                )
            )


_LAYER = re.compile(r"^layer(\d+)$")
_HEAD_ITEM = re.compile(r"^head(\d+)-(\w+)$")


def why_not_collected(argument: str, run: SpectralRun) -> str | None:
    """Why a well-formed spectral id names nothing this run collects, with what to change:
    a layer or head the model lacks, a layer or matrix the options leave out, a scope not
    collected, a missing zero, a stack missing or given where the model has none; ``None``
    when the id is not of the form ``spectral[::STACK]::layerNN[::ITEM]``."""
    parts = argument.split("::")
    if parts[0] != ROOT_NAME or len(parts) < 2:
        return None
    checkpoint = run.checkpoint
    stack: str | None = None
    if parts[1] == VISION and VISION not in checkpoint.stack_layers():
        return (
            "the vision stack is a multimodal model's vision tower, collected with "
            f"--spectral-vision; this run's layers: {ROOT_NAME}::layerNN"
        )
    if parts[1] in STACK_NAMES:
        if not checkpoint.stacks:
            return (
                f"{parts[1]!r} is a stack of an encoder-decoder model; this model's layers "
                f"are not in stacks: {ROOT_NAME}::layerNN"
            )
        if parts[1] not in checkpoint.stack_layers():
            names = ", ".join(span.name for span in checkpoint.stacks)
            return f"{parts[1]!r} is not a stack of this model; its stacks are {names}"
        stack, parts = parts[1], [parts[0], *parts[2:]]
        if len(parts) == 1:
            return f"--spectral-layers leaves out every layer of the {stack} stack"
    elif checkpoint.stacks and _LAYER.match(parts[1]) is None:
        names = ", ".join(span.name for span in checkpoint.stacks)
        return f"{parts[1]!r} is not a stack of this model; its stacks are {names}"
    layer_match = _LAYER.match(parts[1]) if len(parts) in (2, 3) else None
    if layer_match is None:
        return None
    if stack is None and None not in checkpoint.stack_layers():
        return (
            "an encoder-decoder model's layers are in stacks: "
            f"{ROOT_NAME}::{STACKS[0]}::{parts[1]} ({', '.join(STACKS)})"
        )
    layer = int(layer_match.group(1))
    block = checkpoint.block(stack, layer)
    if block is None:
        stacks = checkpoint.stack_layers()
        return layer_counts({stack: stacks[stack]}, stacks)
    if block not in run.layers:
        return f"--spectral-layers leaves out layer {layer}"
    named = next(name for name, number in layer_names(run) if number == block)
    padded = named.rpartition("::")[2]
    if parts[1] != padded:
        return f"layer numbers are zero-padded: {ROOT_NAME}::{named}"
    if len(parts) == 2:
        return None
    item = parts[2]
    head_match = _HEAD_ITEM.match(item)
    if head_match is None:
        return _why_not_whole(item, run, block)
    g = checkpoint.geometry_at(block)
    head, matrix = int(head_match.group(1)), head_match.group(2)
    if head >= g.heads:
        return head_counts(checkpoint, [stack])
    if matrix in WHOLE_ONLY_MATRICES:
        whole = f"{matrix} exists only as a whole matrix: {ROOT_NAME}::{named}::{matrix}"
        if "matrix" in run.scopes:
            return whole
        return f"{whole} with --spectral-scope matrix (or both)"
    if matrix not in HEAD_MATRICES:
        return f"head items are of {', '.join(HEAD_MATRICES)}, not {matrix!r}"
    if "head" not in run.scopes:
        return "head items need --spectral-scope head (the default) or both"
    if matrix in CIRCUITS and matrix not in run.head_matrices:
        return f"the {matrix} circuit is collected only when --spectral-matrices names it"
    if matrix not in run.head_matrices:
        return f"--spectral-matrices leaves out {matrix}"
    return "head numbers are zero-padded, as --collect-only -q lists them"


def _why_not_whole(item: str, run: SpectralRun, block: int) -> str | None:
    matrix, expert = split_expert_item(item)
    if expert is not None and (block, matrix) not in run.checkpoint.tensors:
        return f"layer {block} has no experts (a dense layer, or the checkpoint has none)"
    if expert is not None and (block, matrix) in run.checkpoint.experts:
        count = run.checkpoint.experts[(block, matrix)].count
        if expert >= count:
            return f"layer {block} has {counted(count, 'expert')} ({indices(count)})"
    if matrix in CIRCUITS:
        return f"the {matrix} circuit exists per head only: {ROOT_NAME}::layerNN::headNN-{matrix}"
    if matrix not in MATRICES + WHOLE_ONLY_MATRICES:
        return None
    if matrix not in run.checkpoint.attention + run.checkpoint.mlp:
        return f"the checkpoint has no {matrix}"
    if (block, matrix) not in run.checkpoint.tensors and (
        elsewhere := _other_stacks_matrix(run, block, matrix)
    ):
        return elsewhere
    if (block, matrix) not in run.checkpoint.tensors:
        return (
            f"layer {block} has no {matrix} (a mixture of experts' dense and sparse layers differ)"
        )
    if "matrix" not in run.scopes:
        return (
            f"{matrix} names a whole-matrix item, collected with --spectral-scope matrix (or both)"
        )
    if matrix in run.whole_matrices:
        return "expert numbers are zero-padded, as --collect-only -q lists them"
    return f"--spectral-matrices leaves out {matrix}"


def _other_stacks_matrix(run: SpectralRun, block: int, matrix: str) -> str | None:
    """Why ``block``'s layer has no ``matrix`` when the layers of another stack have it: a
    cross-attention stack has no MLP of its own (the decoder stack's is after it), a vision
    tower's MLP is fc1/fc2 and its text model's gate/up/down. None when no other stack has it
    (a mixture of experts' dense and sparse layers differ)."""
    checkpoint = run.checkpoint
    stack, layer = checkpoint.position(block)
    holders = [
        s
        for s in dict.fromkeys(
            checkpoint.position(b)[0] for b, m in checkpoint.tensors if m == matrix
        )
        if s != stack
    ]
    if not holders:
        return None
    holder = holders[0]
    number = f"layer{layer:02d}" if checkpoint.block(holder, layer) is not None else "layerNN"
    path = "::".join(p for p in (ROOT_NAME, holder, number, matrix) if p is not None)
    owner = f"the {stack} stack" if stack is not None else "the text model"
    own = [
        m
        for m in checkpoint.mlp
        if any(checkpoint.position(b)[0] == stack for b, k in checkpoint.tensors if k == m)
    ]
    if not own:  # cross-attention: the MLP after it is its decoder layer's
        decoder = f"{ROOT_NAME}::decoder::layerNN::{matrix}"
        return f"{owner} has no MLP of its own: its layer's {matrix} is {decoder}"
    theirs = f"the {holder} stack's" if holder is not None else "the text model's"
    return f"{owner}'s MLP is {', '.join(own)}; {matrix} is {theirs}: {path}"


def collection_notice(config: pytest.Config) -> str | None:
    """The header line of a run that leaves the user's tests out, or ``None``.

    pytest collects its ``testpaths`` (or the invocation directory) when no path is given; a
    spectral run does not, and this line says what it collects instead and how to include
    them: name the paths on the command line.
    """
    source = config.args_source
    if source == pytest.Config.ArgsSource.ARGS:
        return None
    if source == pytest.Config.ArgsSource.TESTPATHS:
        paths = list(config.getini("testpaths"))
        where = f"(testpaths: {', '.join(paths)})"
    else:
        paths = ["."]
        where = "(in the current directory)"
    command = shlex.join(["pytest", *paths, *config.invocation_params.args])
    return printable(
        f"spectral: collecting only the spectral items; your tests {where} are not "
        f"collected: name them, e.g. `{command}`"
    )
