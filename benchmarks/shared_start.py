"""What a sweep saves by decomposing once per distinct start: a run's start decomposed vs read back.

For each model family and init, in this process: the time of `milora.get_model` (the SVDs a run
does when it decomposes its own start) against `milora.adapter.load.load_start` (a later run of
the same start rebuilding it from the first run's saved adapter: read, W_res = W - s B0 A0, no SVD),
each on a fresh copy of the base, and checks that the two models' adapted weights are equal bit for
bit. Families: the embedded SmolLM2-135M at the embedded sweep's settings (r = 16, the paper's five
targets, float32), and a random LLaMA-2-7B-wide model with one decoder layer (hidden 4096,
intermediate 11008, r = 64, the same targets, float32): per layer of a 7B, the part that scales.

    python benchmarks/shared_start.py [--repeats 3] [--inits milora pissa]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from peft import LoraConfig

from milora import get_model, load_base_model, save_adapter
from milora.adapter.load import load_start
from milora.constants import PAPER_TARGETS


def seven_b_wide_layer() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    return LlamaForCausalLM(config).eval()


def timed(build, *args, **kwargs) -> tuple[float, torch.nn.Module]:
    start = time.perf_counter()
    model = build(*args, **kwargs)
    return time.perf_counter() - start, model


def residuals(model) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if "base_layer" in name or "lora_" in name}


def measure(family: str, base: torch.nn.Module, rank: int, init: str, repeats: int) -> None:
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(PAPER_TARGETS), task_type="CAUSAL_LM")
    decompose, rebuild = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(repeats):
            seconds, decomposed = timed(get_model, copy.deepcopy(base), copy.deepcopy(config), init=init,
                                        progress=False)
            decompose.append(seconds)
        save_adapter(decomposed, scratch)
        for _ in range(repeats):
            seconds, rebuilt = timed(load_start, copy.deepcopy(base), scratch, copy.deepcopy(config), init, seed=0)
            rebuild.append(seconds)
        same = all(torch.equal(a, b) for a, b in zip(residuals(decomposed).values(), residuals(rebuilt).values(),
                                                       strict=True))
    d, r = statistics.median(decompose), statistics.median(rebuild)
    print(f"{family:28s} {init:7s} r={rank:<3d} decompose {d:7.2f} s  read back {r:6.2f} s  "
          f"ratio {d / r:6.1f}x  saved per reusing run {d - r:6.2f} s  bitwise equal: {same}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inits", nargs="+", default=["milora", "pissa"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    families = [("SmolLM2-135M (embedded)", lambda: load_base_model(None)[0], 16),
                ("LLaMA-2-7B-wide, 1 layer", seven_b_wide_layer, 64)]
    for family, make, rank in families:
        base = make()
        for init in args.inits:
            measure(family, base, rank, init, args.repeats if "Smol" in family else 1)
        del base


if __name__ == "__main__":
    main()
