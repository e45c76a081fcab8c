"""Reading files that may be hostile: regular files only, never blocking, never unbounded.

Every file the plugin reads (``config.json``, weight indexes, shards, ``.bin`` files, rules,
baseline reports, architecture files) may come from a third party. A path must resolve to a
regular file: a named pipe would block ``open`` or ``read`` forever, a character device such as
``/dev/zero`` never ends, a directory or socket cannot be read, and each gets a message saying
what the path is. Files are opened ``O_RDONLY | O_NONBLOCK | O_NOCTTY`` and checked again with
``fstat`` on the descriptor that is read, so a pipe swapped in after the check cannot block
either, and nothing is ever opened for writing.

Text inputs are refused above a size cap before they are parsed, parse errors (including a
``RecursionError`` from absurd nesting) become one-line messages, and the parsed document may
nest at most :data:`MAX_NESTING` levels, so no later code can recurse into a stack overflow.

Weight files are identified at collection by :class:`FileIdentity`; :func:`read_verified`
checks the identity on the descriptor it reads, before and after, and raises
:class:`FileChangedError` when the file is no longer the one collected. Reads are plain
``pread`` calls into the caller's buffer, never memory maps, so a file truncated under the run
is a short read, not a ``SIGBUS`` that kills the interpreter.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

MiB = 2**20
#: ``config.json``: real ones are a few KB; label maps of classifiers reach about 1 MB.
MAX_CONFIG_BYTES = 4 * MiB
#: ``*.index.json``: about 90 bytes per tensor, so room for some 180,000 tensors.
MAX_INDEX_BYTES = 16 * MiB
#: Rules and architecture TOML files: written by hand, a few KB.
MAX_TOML_BYTES = 1 * MiB
#: A baseline (an earlier ``--spectral-report``): about 4 KB per head item with head_dim 128,
#: so a 64,512-item report of a 405B-parameter model is some 260 MB.
MAX_REPORT_BYTES = 1024 * MiB
#: Containers nested deeper than this are refused; real inputs nest fewer than 10 levels.
MAX_NESTING = 64

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UntrustedFileError(ValueError):
    """A file that cannot be read as what it claims; the message starts with its path."""


class MissingFileError(UntrustedFileError):
    """The path names nothing at all (not even a broken symlink)."""


class FileChangedError(OSError):
    """A weight file that is no longer the one collected; its items fail, the run goes on."""


@dataclass(frozen=True)
class FileIdentity:
    """What identifies one version of a file: an in-place rewrite changes ``ctime_ns`` even
    when it restores size and ``mtime``, and a replacement changes the inode."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(
            status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns
        )

    def differences(self, now: FileIdentity) -> str:
        """What changed between ``self`` (collected) and ``now``, for a message."""
        changes = []
        if (self.device, self.inode) != (now.device, now.inode):
            changes.append("replaced by another file")
        if self.size != now.size:
            changes.append(f"size {self.size} -> {now.size} bytes")
        if self.mtime_ns != now.mtime_ns:
            changes.append("modified")
        if self.ctime_ns != now.ctime_ns and self.mtime_ns == now.mtime_ns:
            changes.append("rewritten or its metadata changed (ctime)")
        return ", ".join(changes)


def check_regular(path: Path) -> None:
    """Raise :class:`UntrustedFileError` saying what ``path`` is, unless it is a regular file.

    Symlinks are followed, as ``open`` would follow them; the message says where a link leads.
    """
    try:
        status = os.stat(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if not stat.S_ISREG(status.st_mode):
        raise _not_regular(path, status.st_mode)


def _not_regular(path: Path, mode: int) -> UntrustedFileError:
    kind = next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")
    via = f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return UntrustedFileError(
        f"{path}: is {kind}{via}, not a regular file; only regular files are read"
    )


def _unreadable(path: Path, exc: OSError) -> UntrustedFileError:
    if exc.errno == errno.ELOOP:
        return UntrustedFileError(f"{path}: is a symlink loop, not a regular file")
    if isinstance(exc, FileNotFoundError) and os.path.islink(path):
        return UntrustedFileError(f"{path}: is a broken symlink (to {os.readlink(path)})")
    if isinstance(exc, FileNotFoundError):
        return MissingFileError(f"{path}: no such file or directory")
    return UntrustedFileError(f"{path}: cannot read: {exc.strerror or exc}")


@contextmanager
def open_regular(path: Path) -> Iterator[tuple[int, os.stat_result]]:
    """A read-only, non-blocking descriptor of the regular file ``path``, and its ``fstat``.

    Raises :class:`UntrustedFileError` (:class:`MissingFileError` when nothing is there).
    """
    check_regular(path)
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):  # swapped after the check above
            raise _not_regular(path, status.st_mode)
        yield descriptor, status
    finally:
        os.close(descriptor)


def pread_into(descriptor: int, buffer: memoryview, offset: int) -> int:
    """Fill ``buffer`` from ``offset``; returns how many bytes the file had (short at its end)."""
    filled = 0
    while filled < len(buffer):
        count = os.preadv(descriptor, [buffer[filled:]], offset + filled)
        if count == 0:
            break
        filled += count
    return filled


def read_at(descriptor: int, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
    buffer = bytearray(length)
    return bytes(buffer[: pread_into(descriptor, memoryview(buffer), offset)])


def read_capped(path: Path, limit: int, what: str) -> bytes:
    """The whole of ``path``, refused without reading when it is over ``limit`` bytes."""
    try:
        with open_regular(path) as (descriptor, status):
            if status.st_size > limit:
                raise UntrustedFileError(_too_large(path, what, limit, status.st_size))
            # one byte more than fstat said: the file may have grown since
            data = read_at(descriptor, 0, status.st_size + 1)
    except OSError as exc:
        raise UntrustedFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise UntrustedFileError(_too_large(path, what, limit, len(data)))
    return data


def _too_large(path: Path, what: str, limit: int, size: int) -> str:
    cap = f"{limit // MiB} MiB"
    return f"{path}: {size} bytes, over the {cap} cap for this {what}; refused unparsed"


def load_json(path: Path, limit: int, what: str) -> object:
    """Parse the JSON file ``path`` (capped at ``limit`` bytes and :data:`MAX_NESTING`)."""
    return parse_json(read_capped(path, limit, what), path, what)


def parse_json(raw: bytes, path: Path, what: str) -> object:
    """Parse the bytes ``raw`` read from ``path`` (nested at most :data:`MAX_NESTING`)."""
    try:
        document = json.loads(raw)
    except RecursionError:
        raise UntrustedFileError(f"{path}: {what} nested too deeply to parse") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, or an int past Python's digit limit
        raise UntrustedFileError(f"{path}: {what} is not valid JSON ({exc})") from None
    check_nesting(document, path, what)
    return document


def load_toml(path: Path, limit: int, what: str) -> tuple[dict[str, object], str, bytes]:
    """Parse the TOML file ``path``; returns the document, its text and its raw bytes."""
    raw = read_capped(path, limit, what)
    try:
        text = raw.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(
            f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except RecursionError:
        raise UntrustedFileError(f"{path}: {what} nested too deeply to parse") from None
    except ValueError as exc:  # TOMLDecodeError, or an int past Python's digit limit
        raise UntrustedFileError(f"{path}: {what}: TOML syntax error: {exc}") from None
    check_nesting(document, path, what)
    return document, text, raw


def check_nesting(document: object, path: Path, what: str) -> None:
    """Refuse lists and tables nested deeper than :data:`MAX_NESTING` (iteratively: a check
    that recursed would fail on exactly the input it is meant to refuse)."""
    pending: list[tuple[object, int]] = [(document, 1)] if isinstance(document, dict | list) else []
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > MAX_NESTING:
            raise UntrustedFileError(
                f"{path}: {what} nests more than {MAX_NESTING} levels deep; refused"
            )
        pending.extend((c, depth + 1) for c in children if isinstance(c, dict | list))  # type: ignore[union-attr]


def read_verified(
    path: Path, identity: FileIdentity, pieces: Sequence[tuple[int, memoryview]]
) -> None:
    """Fill each ``(offset, buffer)`` of ``pieces`` from ``path``, which must still be the file
    collected as ``identity``: checked with ``fstat`` on the descriptor read, before and after.

    Raises :class:`FileChangedError` naming the file and what changed.
    """
    try:
        with open_regular(path) as (descriptor, status):
            _same_file(path, identity, FileIdentity.of(status))
            for offset, buffer in pieces:
                if pread_into(descriptor, buffer, offset) < len(buffer):
                    now = FileIdentity.of(os.fstat(descriptor))
                    raise FileChangedError(
                        f"{path} changed after collection (it ends before byte "
                        f"{offset + len(buffer)}; {identity.differences(now) or 'truncated'}); "
                        "run again"
                    )
            _same_file(path, identity, FileIdentity.of(os.fstat(descriptor)))
    except UntrustedFileError as exc:
        raise FileChangedError(
            f"{path} changed after collection ({str(exc).removeprefix(f'{path}: ')}); run again"
        ) from None
    except FileChangedError:
        raise
    except OSError as exc:
        raise FileChangedError(
            f"{path} became unreadable after collection ({exc.strerror or exc}); run again"
        ) from None


def _same_file(path: Path, collected: FileIdentity, now: FileIdentity) -> None:
    if now != collected:
        raise FileChangedError(
            f"{path} changed after collection ({collected.differences(now)}); run again"
        )
