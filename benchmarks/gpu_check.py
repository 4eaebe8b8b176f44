"""GPU check: MiLoRA init on LLaMA-2-7B shapes and a bfloat16 training step, MiLoRA vs LoRA, on one device.

Run by `benchmarks/gpu_check.sh` (under 8 minutes on one H200 by the estimate in
benchmarks/RESULTS.md; parts that would overrun ``--budget`` are skipped and say so). Writes
``results.json`` and ``results.md`` to ``--output``.

1. Init: the five adapted weights of one LLaMA-2-7B layer (q,k,v 4096^2, up 11008 x 4096,
   down 4096 x 11008; spectra `gaussian` and `power` from benchmarks/spectra.py), each on the
   device: the paper's float32 `torch.linalg.svd` against `milora.select_components(W, 64,
   "milora", "auto")` (eigh on the device: float64 Gram matrix and `torch.linalg.eigh`), best of
   two; the subspace errors of both against a float64 numpy SVD on the host (one 4096^2 and
   one 11008 x 4096 weight per family); the layer's sum, times 32 for the whole model.
2. Training: a two-layer LLaMA-2-7B-shaped model (random weights, bfloat16, vocab 32000),
   LoRA r = 64 on q,k,v,up,down, AdamW; MiLoRA (`milora.get_model`, init on the device) and
   PEFT LoRA (`get_peft_model`) built from the same weights, alternating steps (ABBA), median
   step time and peak memory (target: ratios <= 1.02).

    python benchmarks/gpu_check.py --output gpu_check_results            # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --output /tmp/gpu  # the same code path, sides / 16
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spectra  # benchmarks/ is not a package
from init_speed import minor, paper_svd, subspace_error, timed
from train_step import static_bytes, step, step_peak_bytes

from milora.linalg.decomposition import select_components

LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "up_proj": (11008, 4096),
         "down_proj": (4096, 11008)}
TARGETS = list(LAYER)
FAMILIES = ("gaussian", "power")
RANK = 64


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def init_part(device: str, scale: int, deadline: float) -> dict:
    """Per weight of one layer and family: paper and milora seconds on the device, errors against float64."""
    results = {}
    for family in FAMILIES:
        rows = {}
        for seed, (name, (out_features, in_features)) in enumerate(LAYER.items()):
            if time.perf_counter() > deadline:
                results["skipped"] = f"time budget reached before {family} {name}"
                return results
            host = spectra.weight(family, out_features // scale, in_features // scale, RANK, seed=seed)
            weight = host.to(device)
            if seed == 0:
                paper_svd(weight)  # warm-up: cuSOLVER handles and workspaces
            (U32, _, Vh32), paper_seconds = timed(functools.partial(paper_svd, weight), 2)
            parts, milora_seconds = timed(functools.partial(select_components, weight, RANK, "milora", "auto"), 2)
            row = {"shape": list(weight.shape), "paper_s": paper_seconds, "milora_s": milora_seconds,
                   "solver": parts.solver}
            if name in ("q_proj", "up_proj"):  # one float64 reference per shape
                U, S, Vh = np.linalg.svd(host.double().numpy(), full_matrices=False)
                reference = minor(tuple(map(torch.from_numpy, (U, S, Vh))), RANK)
                row["paper_err"] = subspace_error(U32[:, -RANK:].double().cpu(), Vh32[-RANK:].double().cpu(), reference)
                row["milora_err"] = subspace_error(parts.U.cpu(), parts.Vh.cpu(), reference)
            rows[name] = row
            print(f"init {family} {name} {tuple(weight.shape)}: paper {paper_seconds:.2f} s, "
                  f"milora {milora_seconds:.2f} s ({parts.solver})", flush=True)
        layer_paper = sum(row["paper_s"] for row in rows.values())
        layer_milora = sum(row["milora_s"] for row in rows.values())
        results[family] = {"weights": rows, "layer_paper_s": layer_paper, "layer_milora_s": layer_milora,
                           "ratio": layer_paper / layer_milora, "model_paper_s": 32 * layer_paper,
                           "model_milora_s": 32 * layer_milora}
    return results


def llama(scale: int, device: str, vocab: int):
    """A two-layer LLaMA-2-7B-shaped model (sides / scale), random weights, bfloat16, on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096 // scale, intermediate_size=11008 // scale, num_hidden_layers=2,
                         num_attention_heads=32 // scale, num_key_value_heads=32 // scale, vocab_size=vocab,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 7B-wide layers take a while on one CPU thread
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.use_cache = False
    return model


def train_part(device: str, scale: int, batch: int, seq: int, rounds: int) -> dict:
    """MiLoRA vs PEFT LoRA training steps on the same bfloat16 base: median step time and peak memory."""
    from peft import LoraConfig, get_peft_model

    import milora

    config = {"r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.05, "target_modules": TARGETS,
              "task_type": "CAUSAL_LM"}
    base = llama(scale, device, vocab=32000 // scale)
    start = time.perf_counter()
    milora_model = milora.get_model(copy.deepcopy(base), LoraConfig(**config), progress=False)
    synchronize(device)
    init_seconds = time.perf_counter() - start
    variants = {"lora": get_peft_model(base, LoraConfig(**config)), "milora": milora_model}
    pairs = {}
    for name, model in variants.items():
        model.train()
        pairs[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    data = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    for pair in pairs.values():  # warm-up: allocator pools, optimizer state, kernels
        step(*pair, data)
    memory = {name: static_bytes(*pair) + step_peak_bytes(*pair, data, device) for name, pair in pairs.items()}
    times = {name: [] for name in pairs}
    for index in range(rounds):
        for name in (list(pairs) if index % 2 == 0 else list(reversed(pairs))):
            synchronize(device)
            begin = time.perf_counter()
            step(*pairs[name], data)
            synchronize(device)
            times[name].append(time.perf_counter() - begin)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"train: step lora {median['lora']:.3f} s, milora {median['milora']:.3f} s; milora init {init_seconds:.1f} s",
          flush=True)
    return {"batch": [batch, seq], "rounds": rounds, "milora_init_s": init_seconds, "step_seconds_median": median,
            "step_seconds_all": times, "peak_bytes": memory,
            "time_ratio_milora_over_lora": median["milora"] / median["lora"],
            "memory_ratio_milora_over_lora": memory["milora"] / memory["lora"]}


def markdown(results: dict) -> str:
    """The results as the tables benchmarks/RESULTS.md takes."""
    header = (f"Device: {results['device_name']}; torch {results['torch']}; sides / {results['scale']}; "
              f"{results['seconds']:.0f} s in all.")
    lines = [header, ""]
    init = results.get("init", {})
    lines += ["| family | weight | shape | paper fp32 SVD s | milora s | ratio | solver | paper err | milora err |",
              "|---|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        for name, row in init.get(family, {}).get("weights", {}).items():
            lines.append(f"| {family} | {name} | {row['shape'][0]}x{row['shape'][1]} | {row['paper_s']:.3f} "
                         f"| {row['milora_s']:.3f} | {row['paper_s'] / row['milora_s']:.2f} | {row['solver']} "
                         f"| {row.get('paper_err', float('nan')):.1e} | {row.get('milora_err', float('nan')):.1e} |")
        if family in init:
            layer = init[family]
            lines.append(f"| {family} | layer (5 weights) | | {layer['layer_paper_s']:.2f} "
                         f"| {layer['layer_milora_s']:.2f} | {layer['ratio']:.2f} | x 32 layers: "
                         f"{layer['model_paper_s']:.0f} s vs {layer['model_milora_s']:.0f} s | | |")
    if "skipped" in init:
        lines.append(f"\nInit: {init['skipped']}.")
    train = results.get("train")
    if train:
        lines += ["", "| | median step s | peak memory MiB |", "|---|---|---|"]
        for name in ("lora", "milora"):
            step_seconds, peak = train["step_seconds_median"][name], train["peak_bytes"][name]
            lines.append(f"| {name} | {step_seconds:.4f} | {peak / 2**20:.0f} |")
        lines.append(f"| ratio MiLoRA / LoRA | {train['time_ratio_milora_over_lora']:.3f} "
                     f"| {train['memory_ratio_milora_over_lora']:.3f} |")
    elif "train_skipped" in results:
        lines.append(f"\nTraining: {results['train_skipped']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="gpu_check_results", help="directory for results.json and results.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="sides / 16 and a short training run (checks the code path)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which remaining parts are skipped")
    args = parser.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget
    scale = 16 if args.tiny else 1
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    results = {"device": args.device, "device_name": name, "torch": torch.__version__, "scale": scale}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results["init"] = init_part(args.device, scale, deadline)
    if time.perf_counter() < deadline - (15 if args.tiny else 120):  # the training part needs about two minutes
        results["train"] = train_part(args.device, scale, batch=2 if args.tiny else 4, seq=64 if args.tiny else 512,
                                      rounds=2 if args.tiny else 6)
    else:
        results["train_skipped"] = "time budget reached before the training part"
    results["seconds"] = time.perf_counter() - start
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
