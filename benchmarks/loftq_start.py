"""How far each start on a quantised base is from the original weights: ||Q + s B0 A0 - W||_F / ||W||_F.

    python benchmarks/loftq_start.py

Q is the dequantised base milora trains on (LoftQ: Q(W); the SVD starts: Q(W - s B0 A0); QLoRA:
Q(W) with B0 A0 = 0), on the tiny random LLaMA of the tests (hidden 64, r = 4, alpha = 4, the
paper's five targets), mean over the 10 target weights, for nf4 and int8.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.integrations import dequantize_module_weight

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import milora
from milora.init import init_record, lora_layers, weight_matrix

from conftest import LLAMA_TARGETS, tiny_llama

INITS = ("lora", "milora", "pissa", "loftq")


def start_error(init: str, method: str) -> float:
    config = LoraConfig(r=4, lora_alpha=4, target_modules=LLAMA_TARGETS, lora_dropout=0.0)
    model = milora.get_model(tiny_llama(), config, init=init, quantization=method, progress=False)
    originals = {name: weight_matrix(module).detach().double() for name, module in tiny_llama().named_modules()
                 if isinstance(module, torch.nn.Linear)}
    record, errors = init_record(model), []
    for name, layer in lora_layers(model).items():
        start = torch.zeros_like(originals[name])
        if name in record.initial_factors:
            A0, B0 = record.initial_factors[name]
            start = layer.scaling["default"] * B0.double() @ A0.double()
        base = dequantize_module_weight(layer.get_base_layer()).double()
        errors.append(float((base + start - originals[name]).norm() / originals[name].norm()))
    return sum(errors) / len(errors)


def main() -> None:
    print("| quantisation | " + " | ".join(INITS) + " |")
    print("|---" * (len(INITS) + 1) + "|")
    for method in ("nf4", "int8"):
        print(f"| {method} | " + " | ".join(f"{start_error(init, method):.4g}" for init in INITS) + " |")


if __name__ == "__main__":
    main()
