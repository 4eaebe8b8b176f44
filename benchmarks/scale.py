"""Peak memory and time of `milora init` on random LLaMA-2-wide bfloat16 checkpoints: streaming vs in-memory.

    python benchmarks/scale.py                       # 2, 4, 8 layers, both paths (q_proj,v_proj, r = 16)
    python benchmarks/scale.py --layers 32 --paths streaming --rank 64 --targets default   # the whole 7B shape, once
    python benchmarks/scale.py --shape 70b --layers 1 2 --paths streaming --rank 64 --targets default
    python benchmarks/scale.py --shape qwen3-moe --layers 1 2 --targets q_proj,v_proj,gate_up_proj,down_proj

Each checkpoint has the widths of LLaMA-2-7B (``--shape 7b``: hidden 4096, intermediate 11008,
32 heads), -13B (5120, 13824, 40 heads) or -70B (8192, 28672, 64 heads, 8 key-value heads), or of
Qwen3-30B-A3B (``qwen3-moe``: hidden 2048, 32 heads of 128, 4 key-value heads, 128 experts of
intermediate 768 in every layer, stored one tensor per expert and projection as on the hub), the
vocabulary 32000 and the given depth, in bfloat16, one shard per layer (plus one for the embeddings,
the final norm and the untied lm_head), written with `config.json` and the safetensors index
as `save_pretrained` writes them. Weights are N(0, 0.02^2); layer l's matrices (and expert e's) are
fixed random row permutations of layer 0's (of expert 0's): same spectra, different matrices, so
writing a 13.5 GB checkpoint is bound by the disk, not by the random number generator. Each
`milora init` runs in a fresh child process that reports its own peak RSS (VmHWM of
/proc/self/status) and wall time, so the ratios in-memory / streaming compare two runs on the
same checkpoint in the same invocation.
The per-layer slope is the least-squares line through (layers, value) for each path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 32000


@dataclass(frozen=True)
class Shape:
    """A model's widths (its depth is the benchmark's): a LLaMA-2, or a Qwen3-MoE when ``experts``, whose every
    layer's MLP is ``experts`` experts of width ``intermediate``."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int  # the real model's depth, for the projection
    head_dim: int = 0  # 0: hidden / heads
    experts: int = 0

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.head_width * self.kv_heads


SHAPES = {"7b": Shape(4096, 11008, 32, 32, 32), "13b": Shape(5120, 13824, 40, 40, 40),
          "70b": Shape(8192, 28672, 64, 8, 80), "qwen3-moe": Shape(2048, 768, 32, 4, 48, head_dim=128, experts=128)}


def model_config(shape: Shape, layers: int) -> dict:
    common = {
        "hidden_size": shape.hidden, "num_hidden_layers": layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    if shape.experts:
        return {**common, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "head_dim": shape.head_width, "intermediate_size": 8 * shape.intermediate,  # unused: all layers MoE
                "moe_intermediate_size": shape.intermediate, "num_experts": shape.experts,
                "num_experts_per_tok": min(8, shape.experts), "decoder_sparse_step": 1, "mlp_only_layers": [],
                "norm_topk_prob": True, "rms_norm_eps": 1e-6}
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "intermediate_size": shape.intermediate, "rms_norm_eps": 1e-5}


def layer_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """One layer's matrices by name (relative to the layer), out x in."""
    hidden, inner, q_width = shape.hidden, shape.intermediate, shape.head_width * shape.heads
    shapes = {"self_attn.q_proj": (q_width, hidden), "self_attn.k_proj": (shape.kv_width, hidden),
              "self_attn.v_proj": (shape.kv_width, hidden), "self_attn.o_proj": (hidden, q_width)}
    mlp = {"gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}
    if not shape.experts:
        return shapes | {f"mlp.{name}": size for name, size in mlp.items()}
    experts = {f"mlp.experts.{e}.{name}": size for e in range(shape.experts) for name, size in mlp.items()}
    return shapes | experts | {"mlp.gate": (shape.experts, hidden)}


def make_checkpoint(path: Path, layers: int, shape: Shape = SHAPES["7b"], seed: int = 0) -> Path:
    """A random bfloat16 model of ``shape``'s widths with ``layers`` layers in ``path`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    HIDDEN = shape.hidden

    def normal(*sizes):
        return (torch.randn(*sizes, generator=generator) * 0.02).to(torch.bfloat16)

    first = {}  # layer 0's matrix of each name (expert 0's of each projection), permuted for the others

    def matrix(name: str, size: tuple[int, int]) -> torch.Tensor:
        name = re.sub(r"\.experts\.\d+\.", ".experts.", name)
        if name not in first:
            first[name] = normal(*size)
            return first[name]
        return first[name][torch.randperm(size[0], generator=generator)]
    path.mkdir(parents=True)
    weight_map, total = {}, 0
    shards = [f"model-{index + 1:05d}-of-{layers + 1:05d}.safetensors" for index in range(layers + 1)]
    for layer in range(layers):
        tensors = {f"model.layers.{layer}.{name}.weight": matrix(name, size)
                   for name, size in layer_shapes(shape).items()}
        norms = {"input_layernorm": HIDDEN, "post_attention_layernorm": HIDDEN}
        norms |= {"self_attn.q_norm": shape.head_width, "self_attn.k_norm": shape.head_width} if shape.experts else {}
        for norm, width in norms.items():
            tensors[f"model.layers.{layer}.{norm}.weight"] = torch.ones(width, dtype=torch.bfloat16)
        save_file(tensors, path / shards[layer], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shards[layer]))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    tensors = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN), "lm_head.weight": normal(VOCAB, HIDDEN),
               "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
    save_file(tensors, path / shards[-1], metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, shards[-1]))
    total += sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(model_config(shape, layers), indent=2))
    return path


def measure(argv: list[str]) -> dict:
    """Run ``milora <argv>`` in a child process; its wall time and peak RSS (GiB), from the child itself."""
    # VmHWM, not getrusage: Linux carries ru_maxrss across execve, so a child would report at least the
    # RSS of the process it was forked from; VmHWM belongs to the address space exec created
    code = ("import json, re, sys, time; from milora.cli import main; start = time.perf_counter(); "
            "status = main(sys.argv[1:]); seconds = time.perf_counter() - start; "
            "peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]); "
            "print('MEASURED ' + json.dumps({'status': status, 'seconds': seconds, 'peak_rss_gib': peak / 2**20}))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    line = next((line for line in done.stdout.splitlines() if line.startswith("MEASURED ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"milora {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(line.removeprefix("MEASURED "))
    printed = done.stdout.split("\nadapter saved")[0]
    summary = json.loads(printed[printed.index("{"):])
    result["solvers"] = summary["solvers"]
    return result


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value against layers."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="7b", choices=list(SHAPES), help="the model's widths (default 7b)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--paths", nargs="+", default=["streaming", "in-memory"], choices=["streaming", "in-memory"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj", help="--target-modules, or 'default' (the paper's five)")
    parser.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="milora-scale-", dir=args.workdir))
    rows = {path: [] for path in args.paths}
    try:
        for layers in args.layers:
            start = time.perf_counter()
            checkpoint = make_checkpoint(root / f"llama-{layers}", layers, SHAPES[args.shape])
            size = sum(f.stat().st_size for f in checkpoint.iterdir()) / 2**30
            print(f"# {layers} layers: {size:.2f} GiB written in {time.perf_counter() - start:.0f} s", flush=True)
            for path in args.paths:
                argv = ["init", str(checkpoint), "--output", str(root / f"adapter-{layers}-{path}"),
                        "--rank", str(args.rank)]
                argv += [] if args.targets == "default" else ["--target-modules", args.targets]
                argv += ["--in-memory"] if path == "in-memory" else []
                result = measure(argv)
                rows[path].append((layers, result))
                print(f"{path:9s} layers={layers:2d} seconds={result['seconds']:7.1f} "
                      f"peak_rss_gib={result['peak_rss_gib']:6.2f} solvers={result['solvers']}", flush=True)
                shutil.rmtree(root / f"adapter-{layers}-{path}")
            shutil.rmtree(checkpoint)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| layers | " + " | ".join(f"{p} s | {p} peak RSS GiB" for p in args.paths) + " |"
          + (" RSS in-memory / streaming | time in-memory / streaming |" if len(args.paths) == 2 else ""))
    print("|---" * (1 + 2 * len(args.paths) + (2 if len(args.paths) == 2 else 0)) + "|")
    for index, layers in enumerate(args.layers):
        cells = [f"{rows[p][index][1]['seconds']:.1f} | {rows[p][index][1]['peak_rss_gib']:.2f}" for p in args.paths]
        ratios = ""
        if len(args.paths) == 2:
            s, m = rows["streaming"][index][1], rows["in-memory"][index][1]
            ratios = f" {m['peak_rss_gib'] / s['peak_rss_gib']:.2f} | {m['seconds'] / s['seconds']:.2f} |"
        print(f"| {layers} | " + " | ".join(cells) + " |" + ratios)
    if len(args.layers) > 1:
        shape = SHAPES[args.shape]
        for path in args.paths:
            per_layer = slope([(n, r['seconds']) for n, r in rows[path]])
            print(f"{path}: per layer {per_layer:.1f} s, "
                  f"{slope([(n, r['peak_rss_gib']) for n, r in rows[path]]) * 1024:.0f} MiB peak RSS; "
                  f"projected to the {args.shape} depth ({shape.layers} layers): "
                  f"{per_layer * shape.layers / 60:.0f} min (the per-layer time times the depth)")


if __name__ == "__main__":
    main()
