"""Running pytest on hostile inputs as a CI job would, holding it to what the README promises.

Each run is a separate process, so that a hang is a timeout, a crash of the interpreter is a
signal, and time and peak memory are the run's own. Every hostile input must end in a usage
error (exit 4) or in failing items, within :data:`TIME_LIMIT_S` of CPU time and
:data:`MEMORY_LIMIT_MB` of peak resident memory, with no traceback and no INTERNALERROR,
leaving every file under the test directory as it was except pytest's cache and the paths the
run was allowed to write. Time is the process's own CPU time (user + system, all threads):
on a shared machine, wall time would measure the neighbours; a run that waits instead of
working (a read blocked on a pipe) is caught by the :data:`HANG_S` wall-clock timeout.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

TIME_LIMIT_S = 10
MEMORY_LIMIT_MB = 500
#: A run slower than the limit is reported with its time; one that takes this long has hung.
HANG_S = 60
#: A safety net far above the promise: a regression fails at once instead of eating the machine.
ADDRESS_SPACE_LIMIT = 4 * 2**30
#: Files larger than this (sparse ones made to be refused unread) are compared by their status.
BIG_FILE = 64 * 2**20
#: What a run may write: pytest's cache (where the plugin caches spectra) and bytecode.
ALWAYS_ALLOWED = (".pytest_cache", "__pycache__")

_WRAPPER = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE_LIMIT}, {ADDRESS_SPACE_LIMIT}))
import pytest
code = int(pytest.main(sys.argv[2:]))
# VmHWM is this process's own peak; getrusage's ru_maxrss would include the parent's at fork
status = open("/proc/self/status").read()
peak_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024
usage = resource.getrusage(resource.RUSAGE_SELF)
with open(sys.argv[1], "w") as out:
    json.dump({{"peak_mb": peak_mb, "cpu_s": usage.ru_utime + usage.ru_stime}}, out)
sys.exit(code)
"""


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    output: str
    cpu_s: float
    peak_mb: float


def tree(root: Path) -> dict[str, tuple[str, object]]:
    """What is under ``root``, without opening anything that is not a regular file."""
    found: dict[str, tuple[str, object]] = {}
    for directory, folders, files in os.walk(root):
        folders[:] = [f for f in folders if f not in ALWAYS_ALLOWED]
        for name in folders + files:
            path = Path(directory, name)
            status = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISLNK(status.st_mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(status.st_mode) and status.st_size > BIG_FILE:
                found[key] = ("big file", (status.st_size, status.st_mtime_ns, status.st_ino))
            elif stat.S_ISREG(status.st_mode):
                found[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[key] = ("other", stat.S_IFMT(status.st_mode))
    return found


class HostileRun:
    """``hostile(*args)`` runs pytest on the inputs under the pytester directory."""

    def __init__(self, pytester: pytest.Pytester, scratch: Path) -> None:
        self.pytester = pytester
        self.root = pytester.path
        self.scratch = scratch
        self._runs = itertools.count()

    def __call__(self, *args: str, writes: Iterable[str] = ()) -> Outcome:
        """Run; ``writes`` names the paths (relative to the test directory) it may create."""
        before = tree(self.root)
        result_file = self.scratch / f"run-{next(self._runs)}.json"
        process = self.pytester.popen(
            [sys.executable, "-c", _WRAPPER, str(result_file), *args], stdin=subprocess.DEVNULL
        )
        try:
            out, err = process.communicate(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail(f"pytest {' '.join(args)} hung (killed after {HANG_S} s)")
        output = out.decode(errors="replace") + err.decode(errors="replace")
        assert process.returncode >= 0, f"killed by signal {-process.returncode}:\n{output}"
        assert "Traceback" not in output, output
        assert "INTERNALERROR" not in output, output
        measured = json.loads(result_file.read_text())
        cpu_s, peak_mb = measured["cpu_s"], measured["peak_mb"]
        assert cpu_s < TIME_LIMIT_S, f"took {cpu_s:.1f} s of CPU time:\n{output}"
        assert peak_mb < MEMORY_LIMIT_MB, f"peak {peak_mb:.0f} MB:\n{output}"
        after = tree(self.root)
        allowed = set(writes)
        changed = sorted(
            path
            for path in before.keys() | after.keys()
            if before.get(path) != after.get(path) and path not in allowed
        )
        assert not changed, f"the run changed {changed}"
        print(f"{' '.join(args)}: {cpu_s:.2f} s CPU, {peak_mb:.0f} MB")  # -s shows the figures
        return Outcome(process.returncode, output, cpu_s, peak_mb)

    def passes(self, *args: str, items: int) -> None:
        """Run in this process (no time or memory to measure) and expect every item to pass:
        for the inputs that must not refuse a run."""
        before = tree(self.root)
        result = self.pytester.runpytest(*args)
        output = result.stdout.str() + result.stderr.str()
        assert result.ret == pytest.ExitCode.OK, output
        result.assert_outcomes(passed=items)
        assert tree(self.root) == before

    def refused(self, *args: str, naming: Iterable[str]) -> str:
        """Run and expect a usage error whose message holds each of ``naming``."""
        outcome = self(*args)
        assert outcome.exit_code == pytest.ExitCode.USAGE_ERROR, outcome.output
        for fragment in naming:
            assert fragment in outcome.output, outcome.output
        return outcome.output


@pytest.fixture
def hostile(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> HostileRun:
    return HostileRun(pytester, tmp_path_factory.mktemp("runs"))
