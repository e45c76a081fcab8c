"""Index sets written the way people write page ranges: ``"0-3,8"``.

Used by ``--spectral-layers`` and by the ``layers`` / ``heads`` keys of rules. Kept free of
pytest and torch so that the rules file can be validated before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass


class RangeSyntaxError(ValueError):
    """A range spec that cannot be read; the message says which part and why."""


@dataclass(frozen=True)
class IndexSet:
    """A finite set of non-negative indices, or every index when ``indices`` is ``None``."""

    indices: frozenset[int] | None
    spec: str = "all"

    @classmethod
    def everything(cls) -> IndexSet:
        return cls(None, "all")

    def __contains__(self, index: object) -> bool:
        return self.indices is None or index in self.indices

    def beyond(self, count: int) -> list[int]:
        """Indices of the set that do not exist in a model with ``count`` of them."""
        if self.indices is None:
            return []
        return sorted(i for i in self.indices if i >= count)


def parse_index_set(spec: str | int) -> IndexSet:
    """Parse ``"0-3,8"`` (inclusive ranges, commas) or a bare integer into an :class:`IndexSet`.

    ``"all"`` and ``"*"`` mean every index. Raises :class:`RangeSyntaxError` naming the bad part.
    """
    if isinstance(spec, bool):
        raise RangeSyntaxError(f"expected a range such as '0-3,8', got {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise RangeSyntaxError(f"index {spec} is negative")
        return IndexSet(frozenset({spec}), str(spec))
    if not isinstance(spec, str):
        raise RangeSyntaxError(f"expected a range such as '0-3,8', got {spec!r}")
    text = spec.strip()
    if text in {"all", "*"}:
        return IndexSet.everything()
    if not text:
        raise RangeSyntaxError("empty range; use e.g. '0-3,8' or 'all'")
    indices: set[int] = set()
    for part in text.split(","):
        indices.update(_parse_part(part.strip(), text))
    return IndexSet(frozenset(indices), text)


def _parse_part(part: str, whole: str) -> range:
    if not part:
        raise RangeSyntaxError(f"empty item in {whole!r}; write e.g. '0-3,8'")
    low_text, dash, high_text = part.partition("-")
    low = _parse_int(low_text, part)
    if not dash:
        return range(low, low + 1)
    high = _parse_int(high_text, part)
    if high < low:
        raise RangeSyntaxError(f"range {part!r} runs backwards; write '{high}-{low}'")
    return range(low, high + 1)


def _parse_int(text: str, part: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise RangeSyntaxError(f"{part!r} is not a non-negative integer or a range 'a-b'")
    return int(text)
