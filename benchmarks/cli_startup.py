"""Start-up time of the command line: `milora --help` and each sub-command's `--help`.

Runs ``python -m milora.cli ARGS`` in fresh processes, alternating with a baseline checkout of
milora when one is given (``--baseline DIR``, e.g. a worktree of an older commit), and prints
the median of N runs of each and their ratio.

    python benchmarks/cli_startup.py                        # this checkout only
    python benchmarks/cli_startup.py --baseline /tmp/old    # against an older checkout
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [["--help"], ["init", "--help"], ["train", "--help"], ["eval", "--help"], ["analyze", "--help"]]


def run_seconds(checkout: Path, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "milora.cli", *argv], env=env, cwd=checkout, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="another milora checkout to compare with")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    print(f"{'command':<22} {'this s':>8}" + (f" {'baseline s':>11} {'ratio':>7}" if args.baseline else ""))
    for argv in COMMANDS:
        times, baseline = [], []
        for _ in range(args.runs):  # alternate, so both see the same load
            times.append(run_seconds(here, argv))
            if args.baseline:
                baseline.append(run_seconds(args.baseline, argv))
        line = f"{' '.join(argv):<22} {statistics.median(times):>8.3f}"
        if args.baseline:
            line += (f" {statistics.median(baseline):>11.3f}"
                     f" {statistics.median(baseline) / statistics.median(times):>7.1f}")
        print(line)


if __name__ == "__main__":
    main()
