"""Making text from files safe to show: every control character escaped.

Tensor names, shard names, rule names, paths and config values come from files that may be
hostile. Printed raw, an ESC starts a terminal escape sequence (cursor moves, colours, window
titles), a CR overwrites the line before it, and bidi overrides reorder what the reader sees.
Everything the plugin shows (usage errors, failure reports, warnings, the summary, the
heatmap, the HTML report) passes through :func:`printable`; rich output is also rendered with
markup off, so ``[bold]`` in a name is shown, not obeyed.
"""

from __future__ import annotations


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``str(text)`` with each character that is not printable written as a Python escape.

    Escaped: C0 and C1 controls (ESC, CR, TAB, BEL...), DEL, format characters (bidi
    overrides and isolates, zero-width joiners), line and paragraph separators, surrogates,
    private-use and unassigned code points, and spaces other than the plain one: exactly what
    ``str.isprintable`` rejects. ``keep_newlines`` keeps ``\\n`` for the plugin's own
    multi-line messages (data interpolated into them is escaped without it first). Escapes
    read like ``repr``'s:
    ``\\x1b``, ``\\u202e``, ``\\U000e0001``.
    """
    value = str(text)
    if value.isprintable():
        return value
    return "".join(_escape(c, keep_newlines) for c in value)


def _escape(char: str, keep_newlines: bool) -> str:
    if char.isprintable() or (keep_newlines and char == "\n"):
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
