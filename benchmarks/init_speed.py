"""Init speed and accuracy: the paper's float32 full SVD vs milora's default solver, same run.

For each weight: time of `torch.linalg.svd(W.float())` keeping the r smallest triplets (the
paper's svd_init) and of `milora.select_components(W, r, "milora")` (solver "auto"), their
ratio, and both errors against a float64 full SVD: the sine of the largest principal angle
between the computed and the reference minor subspaces (max over the left and right sides).
Synthetic weights have an LLM-like spectrum: a Gaussian bulk (Marchenko-Pastur, with its hard
edge at 0 for square weights) plus 16 outlier directions. Then all adapted weights of the
embedded SmolLM2-135M (targets q,k,v,up,down) as a whole-model init decomposes them (several
at once on CPU, see `milora.linalg.decomposition.default_workers`), and the peak memory of a
whole-model init above the model.

    python benchmarks/init_speed.py            # full run (several minutes on 2 cores)
    python benchmarks/init_speed.py --quick    # 1024 x 1024 and 2048 x 1024 only
    python benchmarks/init_speed.py --memory   # peak memory of a whole-model init only
    python benchmarks/init_speed.py --device cuda   # LLaMA-7B-sized weights on a GPU + 7B estimate
"""

from __future__ import annotations

import argparse
import functools
import math
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from milora.linalg.decomposition import (
    default_workers,
    principal_angle_sine,
    select_components,
    select_components_many,
)

RANKS = (8, 32, 64)
# Timings are the best of several runs (the minimum filters out interference from other
# processes on shared cores): enough runs for the paper's method to take about TIMING_BUDGET
# seconds, between MIN_REPEATS and MAX_REPEATS, the same number for both methods.
TIMING_BUDGET, MIN_REPEATS, MAX_REPEATS = 10.0, 2, 5


def llm_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    bulk = torch.randn(m, n, generator=generator, dtype=torch.float64) / np.sqrt(n)
    left = torch.randn(m, 16, generator=generator, dtype=torch.float64) / np.sqrt(m)
    right = torch.randn(n, 16, generator=generator, dtype=torch.float64) / np.sqrt(n)
    return (bulk + (left * torch.logspace(1.3, 0.3, 16, dtype=torch.float64)) @ right.T).float()


def subspace_error(U: torch.Tensor, Vh: torch.Tensor, reference) -> float:
    U_ref, Vh_ref = reference
    return max(principal_angle_sine(U, U_ref), principal_angle_sine(Vh.T, Vh_ref.T))


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1, best: float = math.inf):
    """fn's result and its best wall time over ``repeats`` runs and an earlier ``best``.
    Waits for the GPU, if any."""
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        result = fn()
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return result, best


def repeats_for(seconds: float) -> int:
    return min(MAX_REPEATS, max(MIN_REPEATS, math.ceil(TIMING_BUDGET / seconds)))


def paper_svd(weight: torch.Tensor):
    """The paper's svd_init: float32 full SVD (U, S, Vh, descending)."""
    return torch.linalg.svd(weight.float(), full_matrices=False)


def compare_weight(weight: torch.Tensor, ranks) -> list[dict]:
    U64, _, Vh64 = torch.linalg.svd(weight.double(), full_matrices=False)
    _, first = timed(lambda: paper_svd(weight))
    repeats = repeats_for(first)
    (U32, _, Vh32), paper_seconds = timed(lambda: paper_svd(weight), repeats - 1, first)  # one SVD serves every r
    rows = []
    for r in ranks:
        reference = (U64[:, -r:], Vh64[-r:])
        parts, seconds = timed(functools.partial(select_components, weight, r, "milora"), repeats)
        rows.append({
            "shape": tuple(weight.shape), "r": r, "paper_s": paper_seconds, "milora_s": seconds, "solver": parts.solver,
            "paper_err": subspace_error(U32[:, -r:].double(), Vh32[-r:].double(), reference),
            "milora_err": subspace_error(parts.U, parts.Vh, reference), "gap": parts.boundary_gap,
        })
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'weight':>13} {'r':>3} {'paper fp32 SVD s':>16} {'milora s':>9} {'ratio':>6} "
          f"{'paper err':>9} {'milora err':>10} {'solver':>8} {'gap':>8}")
    for row in rows:
        shape = f"{row['shape'][0]}x{row['shape'][1]}"
        print(f"{shape:>13} {row['r']:>3} {row['paper_s']:>16.2f} {row['milora_s']:>9.2f} "
              f"{row['paper_s'] / row['milora_s']:>6.2f} {row['paper_err']:>9.1e} {row['milora_err']:>10.1e} "
              f"{row['solver']:>8} {row['gap']:>8.1e}", flush=True)


def synthetic(shapes, device: str = "cpu") -> list[dict]:
    print(f"== synthetic weights on {device} ==")
    rows = []
    for m, n in shapes:
        rows += compare_weight(llm_like(m, n).to(device), RANKS)
        print_rows(rows[-len(RANKS):])
    return rows


def llama7b_estimate(rows: list[dict], r: int = 64) -> None:
    """LLaMA-2-7B with targets q,k,v,up,down: 32 layers x (3 weights 4096^2 + 2 of 11008 x 4096)."""
    times = {row["shape"]: row for row in rows if row["r"] == r}
    square, rectangular = times[(4096, 4096)], times[(11008, 4096)]
    for method in ("paper", "milora"):
        seconds = 32 * (3 * square[f"{method}_s"] + 2 * rectangular[f"{method}_s"])
        print(f"LLaMA-2-7B estimate, r={r}, {method}: {seconds:.0f} s (32 x (3 x 4096^2 + 2 x 11008x4096))")


def whole_model(r: int) -> None:
    """Every adapted weight of SmolLM2: the paper's loop of float32 SVDs against milora's
    decomposition phase as `get_model` runs it (solver auto, default workers)."""
    from milora.constants import PAPER_TARGETS
    from milora.models import load_base_model

    model, _ = load_base_model()
    weights = [module.weight.detach() for name, module in model.named_modules() if name.endswith(PAPER_TARGETS)]
    references = []
    for weight in weights:
        U64, _, Vh64 = torch.linalg.svd(weight.double(), full_matrices=False)
        references.append((U64[:, -r:], Vh64[-r:]))
    paper, first = timed(lambda: [paper_svd(weight) for weight in weights])
    repeats = repeats_for(first)
    paper, paper_seconds = timed(lambda: [paper_svd(weight) for weight in weights], repeats - 1, first)
    workers = default_workers([tuple(weight.shape) for weight in weights])
    ours, milora_seconds = timed(
        lambda: list(select_components_many(((w, r, None) for w in weights), "milora", "auto", workers)), repeats
    )
    paper_worst = max(subspace_error(U[:, -r:].double(), Vh[-r:].double(), ref) for (U, _, Vh), ref in zip(paper, references))
    milora_worst = max(subspace_error(parts.U, parts.Vh, ref) for parts, ref in zip(ours, references))
    solvers = sorted({parts.solver for parts in ours})
    print(f"== SmolLM2-135M, {len(weights)} weights (q,k,v,up,down), r={r} ==")
    print(f"paper fp32 SVD {paper_seconds:.2f} s, milora {milora_seconds:.2f} s ({', '.join(solvers)}; {workers} workers), "
          f"ratio {paper_seconds / milora_seconds:.2f}; worst error paper {paper_worst:.1e}, milora {milora_worst:.1e}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def init_memory(r: int) -> None:
    """Peak resident memory of a whole-model `milora.get_model` above the model.

    The model's weights are memory-mapped from the safetensors cache and only become
    resident when read, so they are all read first. What the init adds is its LoRA modules
    and the initial factors it keeps (both needed: the adapter, and saving it) plus its
    transient work buffers, reported separately.
    """
    from peft import LoraConfig

    import milora
    from milora.constants import PAPER_TARGETS

    model, _ = milora.load_base_model()
    for parameter in model.parameters():  # make the memory-mapped weights resident
        float(parameter.detach().sum())
    largest = max(m.weight.numel() for n, m in model.named_modules() if n.endswith(PAPER_TARGETS))
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    peft_model = milora.get_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=list(PAPER_TARGETS)), progress=False)
    done.set()
    sampler.join()
    record = peft_model.milora_init
    adapter = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
    kept = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in record.initial_factors.values())
    work, copy = peak[0] - before - adapter - kept, 8 * largest
    print(f"== peak memory of a whole-model init (r={r}, {record.measured['workers']} workers) ==")
    print(f"model {before / 2**20:.0f} MiB resident; peak during init +{(peak[0] - before) / 2**20:.0f} MiB: "
          f"LoRA modules {adapter / 2**20:.0f} MiB + initial factors kept {kept / 2**20:.0f} MiB + work buffers "
          f"{work / 2**20:.0f} MiB = {work / copy:.1f} float64 copies of the largest weight ({copy / 2**20:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only, no SmolLM2")
    parser.add_argument("--memory", action="store_true", help="only the peak memory of a whole-model init")
    parser.add_argument("--device", default=None,
                        help="e.g. cuda: LLaMA-7B-sized weights on that device and a whole-model estimate")
    args = parser.parse_args()
    if args.memory:
        init_memory(64)
        return
    if args.device is not None:
        llama7b_estimate(synthetic([(4096, 4096), (11008, 4096)], args.device))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        synthetic([(1024, 1024), (2048, 1024)])
        return
    llama7b_estimate(synthetic([(2048, 2048), (4096, 4096), (11008, 4096)]))
    whole_model(64)
    # a fresh process: memory freed by the runs above would hide the init's own allocations
    subprocess.run([sys.executable, __file__, "--memory"], check=True)


if __name__ == "__main__":
    main()
