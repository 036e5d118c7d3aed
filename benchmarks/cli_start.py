"""How fast the command line answers when it has nothing heavy to do: ``python -m hpkit --help`` and an
argument error (``python -m hpkit train`` without ``--out``), each a fresh process, median of ``--repeats``.

Usage::

    python benchmarks/cli_start.py [--repeats 7]

Prints a table and the 1-minute load average (a busy machine inflates the times).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"--help": ["--help"], "argument error": ["train"], "python itself": None}


def _seconds(args: list[str] | None) -> tuple[float, int]:
    command = [sys.executable, "-c", "pass"] if args is None else [sys.executable, "-m", "hpkit", *args]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print("| command | median (s) | slowest (s) | exit status |\n|---|---|---|---|")
    for name, case in CASES.items():
        runs = [_seconds(case) for _ in range(args.repeats)]
        times = [t for t, _ in runs]
        label = "python -c pass" if case is None else "python -m hpkit " + " ".join(case)
        print(f"| {label} ({name}) | {statistics.median(times):.3f} | {max(times):.3f} | {runs[0][1]} |")
    print(f"\n1-min load average: {os.getloadavg()[0]:.2f} (2 CPUs here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
