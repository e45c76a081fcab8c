"""Index sets written the way people write page ranges: ``"0-3,8"``.

Used by ``--spectral-layers`` and by the ``layers`` / ``heads`` keys of rules. Kept free of
pytest and torch so that the rules file can be validated before anything heavy is imported.

A set is kept as sorted, disjoint inclusive intervals, never as its members: ``"0-999999999"``
costs one pair of integers, and membership is a binary search.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

#: Larger indices are refused: no model has that many layers or heads, and the bound keeps
#: every number a machine integer (Python would parse a 5,000-digit one slowly, then fail).
MAX_INDEX = 10**18 - 1
_DIGITS = re.compile(r"[0-9]+")

Interval = tuple[int, int]  # inclusive (first, last)


class RangeSyntaxError(ValueError):
    """A range spec that cannot be read; the message says which part and why."""


@dataclass(frozen=True)
class IndexSet:
    """A finite set of non-negative indices, or every index when ``intervals`` is ``None``.

    ``intervals`` are inclusive ``(first, last)`` pairs, sorted, disjoint and not adjacent.
    """

    intervals: tuple[Interval, ...] | None
    spec: str = "all"

    @classmethod
    def everything(cls) -> IndexSet:
        return cls(None, "all")

    @classmethod
    def of(cls, intervals: list[Interval]) -> IndexSet:
        """The union of ``intervals`` (any order, overlaps allowed), its spec written out."""
        merged = _merge(intervals)
        return cls(merged, _spec(merged))

    def __contains__(self, index: object) -> bool:
        if self.intervals is None:
            return True
        if isinstance(index, bool) or not isinstance(index, int):
            return False
        position = bisect.bisect_right(self.intervals, (index, MAX_INDEX + 1)) - 1
        return position >= 0 and self.intervals[position][1] >= index

    def __bool__(self) -> bool:
        return self.intervals is None or bool(self.intervals)

    def beyond(self, count: int) -> IndexSet:
        """The part of the set that does not exist in a model with ``count`` indices
        (``count`` and above); empty (falsy) when everything exists or the set is all."""
        if self.intervals is None:
            return IndexSet.of([])
        return IndexSet.of([(max(a, count), b) for a, b in self.intervals if b >= count])


def parse_index_set(spec: str | int) -> IndexSet:
    """Parse ``"0-3,8"`` (inclusive ranges, commas) or a bare integer into an :class:`IndexSet`.

    ``"all"`` and ``"*"`` mean every index. Raises :class:`RangeSyntaxError` naming the bad part.
    """
    if isinstance(spec, bool):
        raise RangeSyntaxError(f"expected a range such as '0-3,8', got {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise RangeSyntaxError(f"index {spec} is negative")
        if spec > MAX_INDEX:
            raise RangeSyntaxError(f"index {spec} is larger than {MAX_INDEX}")
        return IndexSet(((spec, spec),), str(spec))
    if not isinstance(spec, str):
        raise RangeSyntaxError(f"expected a range such as '0-3,8', got {spec!r}")
    text = spec.strip()
    if text in {"all", "*"}:
        return IndexSet.everything()
    if not text:
        raise RangeSyntaxError("empty range; use e.g. '0-3,8' or 'all'")
    intervals = [_parse_part(part.strip(), text) for part in text.split(",")]
    return IndexSet(_merge(intervals), text)


def _parse_part(part: str, whole: str) -> Interval:
    if not part:
        raise RangeSyntaxError(f"empty item in {whole!r}; write e.g. '0-3,8'")
    low_text, dash, high_text = part.partition("-")
    low = _parse_int(low_text, part)
    if not dash:
        return (low, low)
    high = _parse_int(high_text, part)
    if high < low:
        raise RangeSyntaxError(f"range {part!r} runs backwards; write '{high}-{low}'")
    return (low, high)


def _parse_int(text: str, part: str) -> int:
    text = text.strip()
    if not _DIGITS.fullmatch(text):  # ASCII digits only: str.isdigit() accepts '²'
        raise RangeSyntaxError(f"{part!r} is not a non-negative integer or a range 'a-b'")
    if len(text.lstrip("0")) > len(str(MAX_INDEX)):
        raise RangeSyntaxError(f"{part!r}: index larger than {MAX_INDEX}")
    return int(text)


def _merge(intervals: list[Interval]) -> tuple[Interval, ...]:
    """Sorted, disjoint, non-adjacent intervals covering the same indices."""
    merged: list[Interval] = []
    for first, last in sorted(intervals):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)


def _spec(intervals: tuple[Interval, ...]) -> str:
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in intervals)
