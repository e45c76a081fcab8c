"""Decomposing in a child process, so that pytest and the decomposition do not share a GIL.

In one process, the decomposition's Python steps (slicing, launching each kernel, futures,
metric columns) and pytest's own item loop take turns on the interpreter lock, and each
waits for the other: on a 4096-item run of a Llama-3-8B-shaped checkpoint on 2 cores, the
pool's threads and pytest held the lock over three quarters of the run, and the cores were
idle about 30% of it. :class:`ChildDecomposer` runs a
:class:`~pytest_spectral.compute.decomposer.LocalDecomposer` in a child Python process with
a lock of its own; this process then never imports torch. It has the same interface and
gives the same numbers (the same code on the same threads).

The child runs this module's :func:`main` in the same Python, started on the first unit to
compute. It talks to this process only, over its standard input and output: length-prefixed
pickles of this package's own objects (the checkpoint as collected, the metric requests,
units; spectra and errors back), never of anything read from a file. It writes nothing else
to its standard output (its prints go to standard error), and it ends when its input is
closed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pytest_spectral.compute.decomposer import builtin_requests
from pytest_spectral.compute.units import Unit, UnitError, describe

if TYPE_CHECKING:
    from pytest_spectral.checkpoints.checkpoint import Checkpoint
    from pytest_spectral.compute.decomposer import Decomposed
    from pytest_spectral.judging.metrics import MetricRequest

#: The child's program: this module's :func:`main`, found where this process found the package.
_CHILD = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
    "from pytest_spectral.compute.isolated import main; main()"
)
#: Every message starts with these bytes, so that output the child did not mean as a message
#: (a ``sitecustomize`` printing at start-up) is told apart and passed on to standard error.
_MAGIC = b"pytest-spectral\0"
#: Bytes of such output accepted before the first message; beyond, the child is stopped.
_STRAY_LIMIT = 1 << 20
#: Seconds a child is given to finish its last units once its input is closed.
CLOSE_TIMEOUT = 10.0
_LENGTH_BYTES = 8


class ChildStoppedError(UnitError):
    """The child process ended before answering (killed, out of memory, crashed): the units
    it owed fail with this message."""


class ChildDecomposer:
    """A :class:`~pytest_spectral.compute.decomposer.LocalDecomposer` in a child process.

    Raises :class:`OSError` when the child cannot be started. A unit's result is what the
    child's decomposer gave, or :class:`ChildStoppedError` when the child ended first.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        requests: Sequence[MetricRequest],
        *,
        device: str = "cpu",
        precision: str = "float64",
        threads: int | None = None,
    ) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._to_child: IO[bytes] = self._process.stdin  # type: ignore[assignment]
        self._from_child: IO[bytes] = self._process.stdout  # type: ignore[assignment]
        self._lock = threading.Lock()
        self._pending: dict[int, Future[Decomposed]] = {}
        self._tickets = itertools.count()
        self._stopped: ChildStoppedError | None = None
        options = {"device": device, "precision": precision, "threads": threads}
        try:
            with self._lock:
                self._send_or_stop((checkpoint, builtin_requests(requests), options))
        except BaseException:
            self._process.kill()
            self._process.wait()
            raise
        self._receiver = threading.Thread(
            target=self._receive_all, name="pytest-spectral-child", daemon=True
        )
        self._receiver.start()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._process.pid

    def start(self, layer: int, units: Sequence[Unit]) -> Future[Decomposed]:
        """Ask the child to read and decompose ``units`` of ``layer``; the child works on
        the units it is given in order, holding at most two layers' tensors."""
        future: Future[Decomposed] = Future()
        with self._lock:
            ticket = next(self._tickets)
            self._pending[ticket] = future
            self._send_or_stop((ticket, layer, list(units)))
            if self._stopped is not None:
                self._pending.pop(ticket, None)
                future.set_exception(self._stopped)
        return future

    def close(self) -> None:
        """Close the child's input and wait for it to end (killed after
        :data:`CLOSE_TIMEOUT` seconds)."""
        with self._lock, contextlib.suppress(OSError):  # OSError: it had stopped reading
            self._to_child.close()
        try:
            self._process.wait(timeout=CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._receiver.join()
        self._from_child.close()

    def _send_or_stop(self, message: object) -> None:
        """Send ``message``, or note that the child has stopped (the caller holds the lock)."""
        if self._stopped is not None:
            return
        try:
            _send(self._to_child, message)
        except (BrokenPipeError, ValueError):  # ValueError: the pipe was closed
            self._stopped = self._stopped or ChildStoppedError(
                "the process decomposing the slices stopped; its messages, if any, are above"
            )

    def _receive_all(self) -> None:
        """Hand each answer to the future of its ticket until the child's output ends."""
        why = "before finishing this layer"
        while True:
            try:
                ticket, result, error = _receive(self._from_child)
            except _NotAMessageError:
                why = (
                    f"after writing over {_STRAY_LIMIT} bytes other than its answers to its "
                    "output (does a sitecustomize module print?)"
                )
                self._process.kill()
                break
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self._lock:
                future = self._pending.pop(ticket)
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        code = self._process.wait()
        stopped = ChildStoppedError(
            f"the process decomposing the slices stopped (exit code {code}) {why}; its "
            "messages, if any, are above"
        )
        with self._lock:
            self._stopped = self._stopped or stopped
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(stopped)


class _NotAMessageError(EOFError):
    """What the other side wrote is not a message of this protocol."""


def _send(stream: IO[bytes], message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_MAGIC + len(data).to_bytes(_LENGTH_BYTES, "little") + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> tuple:
    """The next message; :class:`EOFError` at the end of the stream."""
    header = _read_exactly(stream, len(_MAGIC) + _LENGTH_BYTES)
    if not header.startswith(_MAGIC):
        header = _after_stray_output(stream, header)
    return pickle.loads(_read_exactly(stream, int.from_bytes(header[len(_MAGIC) :], "little")))


def _after_stray_output(stream: IO[bytes], start: bytes) -> bytes:
    """The header of the message that follows output the child did not mean as a message
    (a ``sitecustomize`` that prints while Python starts, before :func:`main` moves its
    standard output to standard error); that output is written to this process's standard
    error, where it would have gone. Raises :class:`_NotAMessageError` after
    :data:`_STRAY_LIMIT` bytes without a message."""
    stray = bytearray(start)
    while not stray.endswith(_MAGIC):
        if len(stray) > _STRAY_LIMIT:
            raise _NotAMessageError
        byte = stream.read(1)
        if not byte:
            raise EOFError
        stray += byte
    text = bytes(stray[: -len(_MAGIC)])
    sys.stderr.write(text.decode(errors="replace"))
    sys.stderr.flush()
    return _MAGIC + _read_exactly(stream, _LENGTH_BYTES)


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError
    return data


def _reply(output: IO[bytes], lock: threading.Lock, ticket: int, future: Future) -> None:
    """Send a finished unit batch's spectra, or its error, to the parent."""
    try:
        message: tuple = (ticket, future.result(), None)
    except BaseException as exc:
        message = (ticket, None, exc)
    # OSError: pytest's process has gone (ended, or stopped reading): no one to tell
    with lock, contextlib.suppress(OSError):
        try:
            _send(output, message)  # pickled whole before anything is written
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _send(output, (ticket, None, RuntimeError(describe(exc))))


def main() -> None:
    """The child: decompose what the parent asks for until its input closes.

    It ignores SIGINT: a Ctrl-C reaches the whole process group, and pytest's process, which
    handles it, closes the child's input (or its ending does).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    incoming = sys.stdin.buffer
    outgoing = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt replies
    from pytest_spectral.compute.decomposer import LocalDecomposer

    try:
        checkpoint, requests, options = _receive(incoming)
    except EOFError:  # pytest's process gave up on this child before setting it up
        return
    decomposer = LocalDecomposer(checkpoint, requests, **options)
    lock = threading.Lock()
    try:
        while True:
            try:
                ticket, layer, units = _receive(incoming)
            except EOFError:
                break
            future = decomposer.start(layer, units)
            future.add_done_callback(partial(_reply, outgoing, lock, ticket))
    finally:
        decomposer.close()
        outgoing.close()
