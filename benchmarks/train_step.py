"""Training-step cost of MiLoRA vs plain PEFT LoRA at the same rank, on the embedded SmolLM2-135M.

Both models are built in this process from the same base, get the same batch, and run full
steps (forward, backward, AdamW update) in alternating order (ABBA...), so drift in machine
load hits both alike; the step time is the median over rounds. Peak memory is the peak of
allocated tensor bytes during one step on top of the parameters, gradients and optimizer
state: on CUDA from the caching allocator's statistics, on CPU from the profiler's
allocation events. MiLoRA must cost no more than LoRA: target ratios <= 1.02.

    python benchmarks/train_step.py [--rank 32] [--batch 2] [--seq 128] [--rounds 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from milora import get_model, load_base_model

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def build(init: str, rank: int, device: str):
    """(model, optimizer): ``init="milora"`` via milora.get_model, ``"lora"`` via plain peft.get_peft_model."""
    model, _ = load_base_model(None, device=device)
    model.config.use_cache = False
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = (get_model(model, config, init="milora", progress=False) if init == "milora"
                  else get_peft_model(model, config))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    return peft_model, optimizer


def step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def static_bytes(model, optimizer) -> int:
    """Parameters + optimizer state (gradients are freed between steps, counted in the step peak)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    return total


def step_peak_bytes(model, optimizer, batch, device: str) -> int:
    """Peak allocated bytes during one step, above what was allocated when it started."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, optimizer, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step(model, optimizer, batch)
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per variant (after one warm-up step each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    variants = {name: build(name, args.rank, args.device) for name in ("lora", "milora")}
    vocab = variants["lora"][0].config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    for model, optimizer in variants.values():  # warm-up: allocator pools, optimizer state
        step(model, optimizer, batch)
    memory = {name: static_bytes(*pair) + step_peak_bytes(*pair, batch, args.device) for name, pair in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(*variants[name], batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "device": args.device,
        "rank": args.rank,
        "batch": [args.batch, args.seq],
        "rounds": args.rounds,
        "step_seconds_median": median,
        "step_seconds_all": times,
        "peak_bytes": memory,
        "time_ratio_milora_over_lora": median["milora"] / median["lora"],
        "memory_ratio_milora_over_lora": memory["milora"] / memory["lora"],
    }
    print(f"SmolLM2-135M, rank {args.rank}, batch {args.batch}x{args.seq}, {args.device}, "
          f"{args.rounds} alternating rounds")
    for name in variants:
        print(f"  {name:<7} step {median[name]:.3f} s (median)   peak memory {memory[name] / 2**20:.1f} MiB")
    print(f"  ratio MiLoRA / LoRA: time {results['time_ratio_milora_over_lora']:.3f}, "
          f"memory {results['memory_ratio_milora_over_lora']:.3f} (target <= 1.02)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
