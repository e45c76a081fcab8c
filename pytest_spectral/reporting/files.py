"""Writing report files: checked at startup, replaced whole at the end, never written through
a link someone planted, never put in place of something that is not a file.

A report path is checked before any item runs (a directory, a device, a missing or unwritable
parent would otherwise fail only after the whole run, or, for a device or a pipe, have it
replaced by a regular file). Writing creates a fresh temporary file in the target's directory
with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and a random name (so a pre-planted ``r.json.tmp``
symlink is never followed, and two runs never share a temporary file), then renames it over
the target: readers see the old file or the new one, never half of one, and a symlink at the
target itself is replaced rather than written through. An existing file at a report path is
replaced (or removed as an earlier run's) only when this plugin wrote it
(:func:`check_replaceable`).

Every failure is an :class:`OutputPathError` (or, for a write at the end, an ``OSError``)
whose message names the option and the path, never a traceback.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from pytest_spectral.untrusted import UntrustedFileError, open_regular, read_at


class OutputPathError(ValueError):
    """A report path that cannot be written; the message names the option and the path."""


def check_output_path(path: Path, option: str) -> None:
    """Raise :class:`OutputPathError` unless a regular file can be created at ``path``.

    ``path`` is absolute. Refused: anything at ``path`` that is not a regular file (a
    directory, a character or block device, a named pipe, a socket), followed through a
    symlink (a link to a regular file is allowed: the link is replaced, its target left
    alone); a parent directory that does not exist (it is not created: a typo would otherwise
    scatter directories) or is not a directory; and a parent in which this process cannot
    create a file, which is tried (``/proc`` accepts the permission check and then refuses).
    """
    what = _what_is_there(path, option)
    if what == "a directory":
        raise OutputPathError(f"{option} {path}: is a directory; give a file name")
    if what is not None:
        raise OutputPathError(
            f"{option} {path}: is {what}, not a regular file; pytest-spectral replaces the file "
            "at an output path, so give the path of a file"
        )
    parent = path.parent
    try:
        exists, is_dir = parent.exists(), parent.is_dir()
    except OSError as exc:
        raise OutputPathError(f"{option} {path}: cannot look at {parent}: {_reason(exc)}") from None
    if not exists:
        raise OutputPathError(
            f"{option} {path}: directory {parent} does not exist; create it first"
        )
    if not is_dir:
        raise OutputPathError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot create files in {parent} (permission)")
    try:
        temporary, descriptor = _create_exclusive(path)
        os.close(descriptor)
        temporary.unlink()
    except OSError as exc:
        raise OutputPathError(
            f"{option} {path}: cannot create files in {parent}: {_reason(exc)}"
        ) from None


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


def remove_stale(path: Path, option: str) -> None:
    """Delete an earlier run's file at ``path`` (a regular file, or a symlink, which is removed
    itself), so it cannot pass for this run's if this run ends before writing its own.

    Raises :class:`OutputPathError` when it cannot be removed.
    """
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
    except OSError as exc:
        raise OutputPathError(
            f"{option} {path}: cannot remove the file an earlier run left there: {_reason(exc)}"
        ) from None


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with a file holding ``text`` (UTF-8), through a fresh temporary file.

    The temporary file gets the permissions of any new file (0666 less the umask). Raises
    ``OSError`` when it cannot be written, and :class:`OutputPathError` when something other
    than a regular file or a symlink has appeared at ``path`` since the startup check (it is
    left in place).
    """
    data = text.encode("utf-8")
    temporary, descriptor = _create_exclusive(path)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        what = _what_is_there(path, "the output")
        if what is not None:
            raise OutputPathError(f"{path}: is {what} now, not a regular file; left alone")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


#: what ``stat`` calls the kinds of file that are not regular files
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
}


def _what_is_there(path: Path, option: str) -> str | None:
    """What ``path`` is when it is not a regular file (followed through symlinks), else
    ``None``; ``None`` too for nothing at all or a dangling symlink (replaced when written)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there (or a parent that is no directory, refused next)
    except OSError as exc:
        raise OutputPathError(f"{option} {path}: cannot look at it: {_reason(exc)}") from None
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _create_exclusive(path: Path) -> tuple[Path, int]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return temporary, os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
