"""The training step (or label) a report records for its checkpoint, for histories.

Taken, in order, from ``--spectral-step``, from ``global_step`` in the checkpoint's
``trainer_state.json`` (what transformers' ``Trainer`` writes next to each saved checkpoint),
or from the directory name (``checkpoint-1500`` as the Trainer names them, ``step1500``,
``global_step1500`` as DeepSpeed does, ``iter_0001500`` as Megatron does). Nothing found: the
report has no step, and a history orders it by the time it was created.

``trainer_state.json`` comes with the checkpoint, so it is read like any untrusted file:
regular files only, capped in size, ``global_step`` checked to be a non-negative integer. A
file that is there but unusable is an error rather than a silent fallback: a wrong step
would misplace the report in every history it joins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pytest_spectral.untrusted import MiB, MissingFileError, UntrustedFileError, load_json

#: trainer_state.json holds the log history of the run (a line per logging step): a few MB.
MAX_TRAINER_STATE_BYTES = 64 * MiB
#: Labels are shown in tables and plot axes; real ones are a step number or a short name.
MAX_LABEL_CHARACTERS = 100
#: Steps beyond this are not a count of optimiser steps (JSON integers have no bound).
MAX_STEP = 10**15
_DIRECTORY_STEP = re.compile(r"(?:checkpoint|global_step|step|iter)[-_]?0*(\d{1,15})", re.I)


class StepError(ValueError):
    """A step that cannot be used; the message names the option or file."""


@dataclass(frozen=True)
class Step:
    """A checkpoint's place in a training run.

    ``number`` orders reports (None for a label that is not a number); ``label`` is what
    tables and axes show; ``source`` says where it came from: ``"--spectral-step"``,
    ``"trainer_state.json"`` or ``"directory name"``.
    """

    label: str
    number: int | None
    source: str

    def as_json(self) -> dict[str, object]:
        return {"label": self.label, "number": self.number, "source": self.source}


def step_from_option(text: str) -> Step:
    """``--spectral-step``: a number (``1500``) or a label (``v2-rc1``); raises StepError."""
    label = text.strip()
    if not label or len(label) > MAX_LABEL_CHARACTERS or not label.isprintable():
        raise StepError(
            f"--spectral-step {text!r}: give a step number or a label of 1 to "
            f"{MAX_LABEL_CHARACTERS} printable characters"
        )
    number = int(label) if label.isdecimal() and label.isascii() else None
    if number is not None and number > MAX_STEP:
        raise StepError(f"--spectral-step {text}: beyond {MAX_STEP:.0e}; not a training step")
    return Step(label, number, "--spectral-step")


def checkpoint_step(root: Path) -> Step | None:
    """What the checkpoint directory ``root`` says about its step, or None.

    Raises StepError for a ``trainer_state.json`` that cannot be read or whose
    ``global_step`` is not a non-negative integer.
    """
    state = root / "trainer_state.json"
    try:
        document = load_json(state, MAX_TRAINER_STATE_BYTES, "trainer state")
    except MissingFileError:
        document = None
    except UntrustedFileError as exc:
        raise StepError(f"{exc}; or give the step with --spectral-step") from None
    if document is not None:
        step = document.get("global_step") if isinstance(document, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
            raise StepError(
                f"{state}: global_step must be a non-negative integer, got "
                f"{str(step)[:40]!r}; or give the step with --spectral-step"
            )
        return Step(str(step), step, "trainer_state.json")
    match = _DIRECTORY_STEP.fullmatch(root.name)
    if match is not None:
        return Step(str(int(match.group(1))), int(match.group(1)), "directory name")
    return None
