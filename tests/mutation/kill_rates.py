"""Kill rate per module of the last mutation run, from ``mutmut results --all true``.

Run from the repository root after ``mutmut run`` (README, Development). Timeouts are shown
apart, not counted as killed: on a loaded machine a harmless mutant can time out too. Mutants
listed in
``equivalent_mutants.md`` beside this file (backquoted mutant names) are
counted apart: they cannot be killed because they do not change behaviour.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

EQUIVALENT = Path(__file__).with_name("equivalent_mutants.md")


def equivalent_names() -> set[str]:
    return set(re.findall(r"`([^`]+__mutmut_[0-9]+)`", EQUIVALENT.read_text()))


def main() -> None:
    listing = subprocess.run(
        ["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    equivalent = equivalent_names()
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" not in name or status == "not checked":
            continue
        module = name.rsplit(".x", 1)[0]
        per_module[module]["total"] += 1
        if status == "killed":
            per_module[module]["killed"] += 1
        elif name in equivalent:
            per_module[module]["equivalent"] += 1
        else:
            per_module[module][status] += 1
    print(f"{'module':42} {'killed':>7} {'total':>6} {'equiv':>6} {'rate':>7} {'w/o eq':>7}  other")
    for module, counts in sorted(per_module.items()):
        killed, total, equal = counts["killed"], counts["total"], counts["equivalent"]
        other = ", ".join(
            f"{k} {v}" for k, v in counts.items() if k not in ("killed", "total", "equivalent")
        )
        print(
            f"{module:42} {killed:7} {total:6} {equal:6} {killed / total:7.1%} "
            f"{killed / max(1, total - equal):7.1%}  {other}"
        )


if __name__ == "__main__":
    main()
