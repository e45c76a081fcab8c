"""Counts in words: ``1 item``, ``2 items``, ``the model has 1 layer (0)``.

Messages are read by people, often in CI logs where "1 rules" or "layers (0-0)" makes a reader
wonder whether the tool counted right.
"""

from __future__ import annotations


def counted(number: int, singular: str, plural: str | None = None) -> str:
    """``number`` and the noun that agrees with it: ``counted(1, "item")`` is ``1 item``."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def indices(count: int) -> str:
    """The indices of ``count`` things numbered from 0: ``0-3``, or ``0`` for one."""
    return "0" if count == 1 else f"0-{count - 1}"
