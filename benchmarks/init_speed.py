"""Init speed and accuracy on several spectrum families: the paper's float32 full SVD vs milora's solvers.

Per weight (family x shape x r, `benchmarks/spectra.py`), in one process: the paper's
svd_init (`torch.linalg.svd(W.float())`, keeping the r smallest triplets; one SVD serves
every r of a weight), and `milora.select_components(W, r, "milora", solver)` for solver eigh,
lanczos and auto; "auto / best" is auto's time over the faster of eigh and lanczos (target
<= 1.1). Errors against a float64 full SVD: the sine of the largest principal angle between
the computed and the reference minor subspaces (max over the left and right sides). Then one
LLaMA-2-7B layer (q,k,v 4096^2, up 11008 x 4096, down 4096 x 11008) per family through
`milora init` itself, against the paper's SVD of the same five weights; all adapted weights
of the embedded SmolLM2-135M as a whole-model init decomposes them; and the peak memory of a
whole-model init.

    python benchmarks/init_speed.py                  # everything (about 3 h on 2 idle cores)
    python benchmarks/init_speed.py --quick          # 2048^2, r = 16, 64, every family; a quarter-size layer
    python benchmarks/init_speed.py --shapes 4096 --families power,gaussian --ranks 64 --no-layer --no-smollm2
    python benchmarks/init_speed.py --layer-only --families power   # the 7B-layer rows only
    python benchmarks/init_speed.py --memory         # peak memory of a whole-model init only
    python benchmarks/init_speed.py --device cuda --shapes 4096,11008x4096 --ranks 64 --no-layer --no-smollm2

Timings are the best of several runs (the minimum filters out interference from other
processes on shared cores), the same number for every method of a weight.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectra  # benchmarks/ is not a package

from milora.linalg.decomposition import (
    default_workers,
    principal_angle_sine,
    select_components,
    select_components_many,
)

RANKS = (16, 64, 128)
SHAPES = ((2048, 2048), (4096, 4096), (11008, 4096))
SOLVERS_CPU = ("eigh", "lanczos", "auto")
# Enough runs for the paper's method to take about TIMING_BUDGET seconds, between MIN_REPEATS
# and MAX_REPEATS; every milora solver of that weight gets the same number.
TIMING_BUDGET, MIN_REPEATS, MAX_REPEATS = 10.0, 2, 5


def subspace_error(U: torch.Tensor, Vh: torch.Tensor, reference) -> float:
    """Sine of the largest principal angle to the reference's subspaces, max over both sides.
    Vectors of zero singular values (``reference``'s S below 1e-8 of its largest) are left out:
    any basis of the null spaces is right, and they enter the adapter multiplied by zero."""
    U_ref, S_ref, Vh_ref = reference
    kept = S_ref > 1e-8 * S_ref.max()
    if not kept.any():
        return 0.0
    return max(principal_angle_sine(U[:, kept], U_ref[:, kept]), principal_angle_sine(Vh[kept].T, Vh_ref[kept].T))


def minor(triplets, r: int):
    """The r smallest of full SVD triplets (U, S, Vh), descending."""
    U, S, Vh = triplets
    return U[:, -r:], S[-r:], Vh[-r:]


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1, best: float = math.inf):
    """fn's result and its best wall time over ``repeats`` runs and an earlier ``best``. Waits for the GPU, if any."""
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


def weight_rows(family: str, shape: tuple[int, int], ranks, solvers, device: str = "cpu") -> list[dict]:
    """One row per r: every solver's time, outcome and error, and the paper's, on one weight
    (a weight per r for the clustered family, whose cluster sits at the rank-r boundary)."""
    rows = []
    per_rank = family == "clustered"
    for group in ([[r] for r in ranks] if per_rank else [list(ranks)]):
        weight = spectra.weight(family, *shape, group[0]).to(device)
        exact = torch.linalg.svd(weight.double(), full_matrices=False)
        paper = functools.partial(paper_svd, weight)
        (U32, _, Vh32), first = timed(paper)
        repeats = repeats_for(first)
        (U32, _, Vh32), paper_seconds = timed(paper, repeats - 1, first)
        for r in group:
            reference = minor(exact, r)
            row = {"family": family, "shape": shape, "r": r, "paper_s": paper_seconds,
                   "paper_err": subspace_error(U32[:, -r:].double(), Vh32[-r:].double(), reference)}
            for solver in solvers:
                parts, seconds = timed(functools.partial(select_components, weight, r, "milora", solver), repeats)
                row[solver] = {"s": seconds, "solver": parts.solver, "reason": parts.reason,
                               "err": subspace_error(parts.U, parts.Vh, reference), "gap": parts.boundary_gap}
            rows.append(row)
            print_row(row, solvers)
    return rows


HEADER = ("| weight | family | r | paper fp32 SVD s | eigh s | lanczos s (ran) | auto s (ran) | auto / best "
          "| paper / auto | paper err | auto err | gap |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def print_row(row: dict, solvers) -> None:
    """A markdown table row (HEADER); a solver not run prints as -, and the reason for a hand-over follows the table."""
    shape = f"{row['shape'][0]}x{row['shape'][1]}"
    cell = {s: f"{row[s]['s']:.2f}" if s in row else "-" for s in SOLVERS_CPU}
    for s in ("lanczos", "auto"):
        if s in row:
            cell[s] += f" ({_short(row[s]['solver'])})"
    main = row.get("auto") or row[solvers[0]]
    faster = min(row[s]["s"] for s in ("eigh", "lanczos") if s in row)
    versus = f"{main['s'] / faster:.2f}" if "auto" in row else "-"
    print(f"| {shape} | {row['family']} | {row['r']} | {row['paper_s']:.2f} | {cell['eigh']} | {cell['lanczos']} "
          f"| {cell['auto']} | {versus} | {row['paper_s'] / main['s']:.2f} | {row['paper_err']:.1e} "
          f"| {main['err']:.1e} | {main['gap']:.1e} |", flush=True)
    if main["reason"]:
        print(f"<!-- {shape} {row['family']} r={row['r']}: {main['reason']} -->", flush=True)


def _short(solver: str) -> str:
    short = {"eigh (lanczos over budget)": "eigh: over budget", "eigh (lanczos failed)": "eigh: failed"}
    return short.get(solver, solver)


def llama_layer_dir(family: str, r: int, scale: float, directory: Path) -> dict[str, torch.Tensor]:
    """Save a one-layer LLaMA-2-7B-shaped model (sides multiplied by ``scale``) whose five adapted
    weights have the family's spectrum, to ``directory``; return those weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate = round(4096 * scale), round(11008 * scale)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=max(1, round(32 * scale)), num_key_value_heads=max(1, round(32 * scale)),
                         vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    layer = model.model.layers[0]
    modules = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "v_proj": layer.self_attn.v_proj,
               "up_proj": layer.mlp.up_proj, "down_proj": layer.mlp.down_proj}
    weights = {}
    for seed, (name, module) in enumerate(modules.items()):
        out_features, in_features = module.weight.shape
        weights[name] = spectra.weight(family, out_features, in_features, r, seed=seed, source=name)
        module.weight.data.copy_(weights[name])
    model.save_pretrained(directory)
    return weights


def run_init(model_dir: Path, output: Path, r: int, init: str) -> tuple[float, dict]:
    """Wall time of `milora init` in a fresh process and the summary it prints."""
    command = [sys.executable, "-m", "milora.cli", "init", str(model_dir), "--output", str(output), "--rank", str(r),
               "--init", init, "--overwrite"]
    start = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    return seconds, summary


def adapter_error(tensors: dict[str, torch.Tensor], name: str, reference, r: int) -> float:
    """Subspace error of a saved adapter's initial factors for module ``name``: the first r rows of
    lora_A span V_sel, the first r columns of lora_B span U_sel."""
    A = next(t for key, t in tensors.items() if f".{name}.lora_A" in key)
    B = next(t for key, t in tensors.items() if f".{name}.lora_B" in key)
    return subspace_error(B[:, :r].double(), A[:r].double(), reference)


def layer_row(family: str, r: int = 64, scale: float = 1.0) -> dict:
    """One LLaMA-2-7B layer through `milora init` (its wall time minus `milora init --init lora`'s
    on the same model, and the init's own decomposition time) vs the paper's SVD of the same five
    weights in this process; worst subspace error of each against float64."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, output = Path(tmp) / "model", Path(tmp) / "adapter"
        weights = llama_layer_dir(family, r, scale, model_dir)
        lora_seconds, _ = run_init(model_dir, output, r, "lora")
        milora_seconds, summary = run_init(model_dir, output, r, "milora")
        tensors = load_file(output / "adapter_model.safetensors")
    paper_seconds, paper_err, milora_err = 0.0, 0.0, 0.0
    for name, weight in weights.items():
        (U32, _, Vh32), seconds = timed(functools.partial(paper_svd, weight))
        paper_seconds += seconds
        reference = minor(torch.linalg.svd(weight.double(), full_matrices=False), r)
        paper_err = max(paper_err, subspace_error(U32[:, -r:].double(), Vh32[-r:].double(), reference))
        milora_err = max(milora_err, adapter_error(tensors, name, reference, r))
    row = {"family": family, "r": r, "scale": scale, "paper_s": paper_seconds, "init_wall_s": milora_seconds,
           "lora_wall_s": lora_seconds, "init_s": summary["init_seconds"], "solvers": summary["solvers"],
           "paper_err": paper_err, "milora_err": milora_err}
    decomposition = milora_seconds - lora_seconds
    print(f"| {family} | {r} | {paper_seconds:.1f} | {milora_seconds:.1f} - {lora_seconds:.1f} = {decomposition:.1f} "
          f"| {paper_seconds / decomposition:.2f} | {row['init_s']:.1f} | {paper_seconds / row['init_s']:.2f} "
          f"| {paper_err:.1e} | {milora_err:.1e} | {', '.join(row['solvers'])} |", flush=True)
    return row


LAYER_HEADER = ("| family | r | paper fp32 SVD s (5 weights) | milora init - init lora s | paper / that | init_seconds "
                "| paper / init_seconds | paper worst err | milora worst err | solvers |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


def whole_model(r: int) -> None:
    """Every adapted weight of SmolLM2: the paper's loop of float32 SVDs against milora's
    decomposition phase as `get_model` runs it (solver auto, default workers)."""
    from milora.constants import PAPER_TARGETS
    from milora.models import load_base_model

    model, _ = load_base_model()
    weights = [module.weight.detach() for name, module in model.named_modules() if name.endswith(PAPER_TARGETS)]
    references = [minor(torch.linalg.svd(weight.double(), full_matrices=False), r) for weight in weights]
    paper, first = timed(lambda: [paper_svd(weight) for weight in weights])
    repeats = repeats_for(first)
    paper, paper_seconds = timed(lambda: [paper_svd(weight) for weight in weights], repeats - 1, first)
    workers = default_workers([tuple(weight.shape) for weight in weights])
    ours, milora_seconds = timed(
        lambda: list(select_components_many(((w, r, None) for w in weights), "milora", "auto", workers)), repeats
    )
    paper_worst = max(subspace_error(U[:, -r:].double(), Vh[-r:].double(), ref)
                      for (U, _, Vh), ref in zip(paper, references, strict=True))
    milora_worst = max(subspace_error(parts.U, parts.Vh, ref) for parts, ref in zip(ours, references, strict=True))
    solvers = sorted({parts.solver for parts in ours})
    print(f"== SmolLM2-135M, {len(weights)} weights (q,k,v,up,down), r={r} ==")
    print(f"paper fp32 SVD {paper_seconds:.2f} s, milora {milora_seconds:.2f} s "
          f"({', '.join(solvers)}; {workers} workers), ratio {paper_seconds / milora_seconds:.2f}; "
          f"worst error paper {paper_worst:.1e}, milora {milora_worst:.1e}")


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
    peft_model = milora.get_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=list(PAPER_TARGETS)),
                                  progress=False)
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


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'2048,11008x4096' -> [(2048, 2048), (11008, 4096)]."""
    shapes = []
    for item in text.split(","):
        sides = [int(side) for side in item.lower().split("x")]
        shapes.append((sides[0], sides[-1]))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2048^2 at r = 16, 64, every family, a quarter-size layer")
    parser.add_argument("--shapes", default=None, help="e.g. 2048,4096,11008x4096 (default: those three)")
    parser.add_argument("--families", default=",".join(spectra.FAMILIES))
    parser.add_argument("--ranks", default=None, help="e.g. 16,64,128 (default)")
    parser.add_argument("--layer-scale", type=float, default=1.0, help="sides of the 7B layer multiplied by this")
    parser.add_argument("--layer-only", action="store_true", help="only the 7B-layer rows")
    parser.add_argument("--no-layer", action="store_true", help="skip the 7B-layer rows")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 whole-model rows and memory")
    parser.add_argument("--memory", action="store_true", help="only the peak memory of a whole-model init")
    parser.add_argument("--device", default="cpu", help="where the per-weight decompositions run (cuda: eigh and auto)")
    args = parser.parse_args()
    if args.memory:
        init_memory(64)
        return
    families = args.families.split(",")
    shapes = parse_shapes(args.shapes) if args.shapes else ([(2048, 2048)] if args.quick else list(SHAPES))
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else ([16, 64] if args.quick else list(RANKS))
    scale = 0.25 if args.quick and args.layer_scale == 1.0 else args.layer_scale
    solvers = SOLVERS_CPU if args.device == "cpu" else ("eigh", "auto")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if not args.layer_only:
        print(HEADER)
        for shape in shapes:
            for family in families:
                weight_rows(family, shape, ranks, solvers, args.device)
    if not args.no_layer:
        print(f"\nLLaMA-2-7B layer (sides x {scale:g}) through `milora init`, r = 64:\n{LAYER_HEADER}")
        for family in families:
            layer_row(family, 64, scale)
    if args.quick or args.no_smollm2 or args.layer_only or args.device != "cpu":
        return
    whole_model(64)
    # a fresh process: memory freed by the runs above would hide the init's own allocations
    subprocess.run([sys.executable, __file__, "--memory"], check=True)


if __name__ == "__main__":
    main()
