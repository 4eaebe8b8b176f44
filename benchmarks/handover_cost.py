"""What a Lanczos hand-over costs: ``auto`` against ``eigh`` alone, with repeated, interleaved pairs.

On a weight where Lanczos is tried and hands over (a crowded minor spectrum), ``auto`` runs
the Cholesky factorisation of G and a few block steps before eigh finishes on the same G.
`init_speed.py` times each solver as the best of 2-5 runs, and on 4-5 s solves its runs of
identical work differ by up to 10 %, about the size of the effect. Here each weight gets
``--pairs`` pairs of runs (eigh, auto), the order alternating from pair to pair, and the
paired ratio auto / eigh is summarised by its median with the distribution-free
(order-statistic, sign-test) confidence interval for the median.

    python benchmarks/handover_cost.py                                   # the hand-over rows (~25 min)
    python benchmarks/handover_cost.py --rows power:4096x4096:64 --pairs 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectra  # benchmarks/ is not a package

from milora.linalg.decomposition import select_components

# The rows of init_speed.py where auto tries Lanczos and it hands over by the budget
HANDOVER_ROWS = (
    "power:2048x2048:16",
    "power:4096x4096:16", "power:4096x4096:64", "power:4096x4096:128",
    "gaussian:11008x4096:16", "gaussian:11008x4096:64", "gaussian:11008x4096:128",
    "power:11008x4096:16", "power:11008x4096:64", "power:11008x4096:128",
    "clustered:11008x4096:16", "clustered:11008x4096:64", "clustered:11008x4096:128",
    "real:11008x4096:64", "real:11008x4096:128",
)


def coverage(n: int, j: int) -> float:
    """Probability that [x_(j), x_(n+1-j)] (order statistics, 1-based) of n samples covers the
    population median: sum_{i=j}^{n-j} C(n, i) / 2^n (the sign test's interval)."""
    return sum(math.comb(n, i) for i in range(j, n - j + 1)) / 2**n


def interval_rank(n: int, level: float = 0.95) -> int:
    """The largest j (at least 1) whose interval [x_(j), x_(n+1-j)] covers the median with
    probability >= ``level``; 1 (the full range) if none does."""
    j = 1
    while j + 1 <= n // 2 and coverage(n, j + 1) >= level:
        j += 1
    return j


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """The median of ``values`` and its 95 % order-statistic interval: (median, low, high)."""
    ordered, j = sorted(values), interval_rank(len(values))
    return statistics.median(ordered), ordered[j - 1], ordered[len(values) - j]


def parse_row(spec: str) -> tuple[str, int, int, int]:
    """``family:MxN:r`` as (family, m, n, r) (an argparse type: its errors name the fix)."""
    try:
        family, shape, r = spec.split(":")
        m, n = map(int, shape.split("x"))
        rank = int(r)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected family:MxN:r, e.g. power:4096x4096:64") from None
    if family not in spectra.FAMILIES:
        choices = ", ".join(spectra.FAMILIES)
        raise argparse.ArgumentTypeError(f"{spec!r}: unknown family {family!r}; choose from {choices}")
    if not 0 < rank < min(m, n):
        raise argparse.ArgumentTypeError(f"{spec!r}: r must satisfy 0 < r < min(M, N)")
    return family, m, n, rank


def measure(family: str, m: int, n: int, r: int, pairs: int) -> dict:
    """Paired timings of eigh and auto on one m x n weight of the family, at rank r."""
    weight = spectra.weight(family, m, n, r)
    times = {"eigh": [], "auto": []}
    ran = ""
    for pair in range(pairs):
        order = ("eigh", "auto") if pair % 2 == 0 else ("auto", "eigh")
        for solver in order:
            start = time.perf_counter()
            parts = select_components(weight, r, "milora", solver)
            times[solver].append(time.perf_counter() - start)
            if solver == "auto":
                ran = parts.solver
    ratios = [a / e for a, e in zip(times["auto"], times["eigh"], strict=True)]
    return {"ran": ran, "eigh": times["eigh"], "auto": times["auto"], "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=parse_row, default=[parse_row(row) for row in HANDOVER_ROWS],
                        help="family:MxN:r (default: the hand-over rows)")
    parser.add_argument("--pairs", type=int, default=9, help="pairs of runs per weight (default 9)")
    args = parser.parse_args()
    if args.pairs < 3:
        parser.error("--pairs must be at least 3 for an interval")
    print("| weight | family | r | auto ran | eigh median s | auto median s | auto - eigh s | auto / eigh, median of "
          f"{args.pairs} pairs [CI] | min auto / min eigh |\n|---|---|---|---|---|---|---|---|---|")
    within = 0
    for family, m, n, r in args.rows:
        result = measure(family, m, n, r, args.pairs)
        median, low, high = median_interval(result["ratios"])
        eigh, auto = statistics.median(result["eigh"]), statistics.median(result["auto"])
        within += high <= 1.1
        print(f"| {m}x{n} | {family} | {r} | {result['ran']} | {eigh:.2f} | {auto:.2f} | {auto - eigh:+.2f} "
              f"| {median:.3f} [{low:.3f}, {high:.3f}] | {min(result['auto']) / min(result['eigh']):.3f} |", flush=True)
    j = interval_rank(args.pairs)
    print(f"\nCI: order statistics {j} and {args.pairs + 1 - j} of the paired ratios, covering the median "
          f"with probability {coverage(args.pairs, j):.3f} (sign test). Rows whose whole interval is "
          f"<= 1.1: {within} of {len(args.rows)}.")


if __name__ == "__main__":
    main()
