"""Writing report files: checked at startup, replaced whole at the end, never written through
a link someone planted.

A report path is checked before any item runs (a directory, a missing or unwritable parent
would otherwise fail only after the whole run). Writing creates a fresh temporary file in the
target's directory with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and a random name (so a pre-planted
``r.json.tmp`` symlink is never followed, and two runs never share a temporary file), then
renames it over the target: readers see the old file or the new one, never half of one, and a
symlink at the target itself is replaced rather than written through. An existing file at a
report path is replaced only when this plugin wrote it (:func:`check_replaceable`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pytest_spectral.untrusted import UntrustedFileError, open_regular, read_at


class OutputPathError(ValueError):
    """A report path that cannot be written; the message names the option and the path."""


def check_output_path(path: Path, option: str) -> None:
    """Raise :class:`OutputPathError` unless a file can be created at ``path``.

    ``path`` is absolute. Refused: an existing directory, a parent directory that does not
    exist (it is not created: a typo would otherwise scatter directories) or is not a
    directory, and a parent this process cannot write to.
    """
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a directory; give a file name")
    parent = path.parent
    if not parent.exists():
        raise OutputPathError(
            f"{option} {path}: directory {parent} does not exist; create it first"
        )
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot create files in {parent} (permission)")


#: how many leading bytes of an existing output are searched for the mark of its writer
MARK_WINDOW = 256


def check_replaceable(path: Path, option: str, mark: bytes, what: str) -> None:
    """Raise :class:`OutputPathError` unless what is at ``path`` may be replaced by this run.

    pytest-spectral never deletes a file it did not write: ``path`` may hold nothing, an
    empty file, a symlink (the link is replaced, never written through, so its target is
    untouched), or a file whose first :data:`MARK_WINDOW` bytes hold ``mark``, the signature
    its writer puts there (a report's schema line, a calibrated file's header comment).
    Anything else (a rules file, a README, a named pipe) is refused; ``what`` names the
    output in the message.
    """
    if not os.path.lexists(path) or path.is_symlink():
        return
    try:
        with open_regular(path) as (descriptor, status):
            head = read_at(descriptor, 0, MARK_WINDOW)
    except (UntrustedFileError, OSError) as exc:
        raise OutputPathError(f"{option} {exc}") from None
    if status.st_size == 0 or mark in head:
        return
    raise OutputPathError(
        f"{option} {path}: exists and is not {what} written by pytest-spectral "
        f"(no {mark.decode()!r} at its start); pytest-spectral replaces only its own files: "
        "choose another path, or move that file away first"
    )


def remove_stale(path: Path) -> None:
    """Delete an earlier run's file at ``path`` (not a directory), so it cannot pass for this
    run's if this run ends before writing its own."""
    if path.is_symlink() or path.is_file():
        path.unlink()


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with a file holding ``text`` (UTF-8), through a fresh temporary file.

    The temporary file gets the permissions of any new file (0666 less the umask).
    """
    data = text.encode("utf-8")
    temporary, descriptor = _create_exclusive(path)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _create_exclusive(path: Path) -> tuple[Path, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
