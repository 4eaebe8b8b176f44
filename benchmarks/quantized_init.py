"""QLoRA vs QPiSSA vs QMiLoRA on the embedded SmolLM2-135M-Instruct: what 4-bit quantisation does to each start.

For each init mode (``lora`` quantises W itself, as QLoRA; ``pissa`` W minus its principal
part, as QPiSSA; ``milora`` W minus its minor part), on the demo's task (reasoning-gym
``chain_sum``, one-digit sums, `milora.demos.text`):

1. init with ``quantization``: per target weight the quantisation error of the residual
   ||Q(W_res) - W_res|| / ||W_res|| and the same noise in units of ||W||, the share of W the
   adapter holds ||s B0 A0|| / ||W||, and the model's output error at init against the
   full-precision model, teacher-forced on the first ``--probe`` held-out question + answer
   pairs in the chat template, padding excluded: relative Frobenius error of the logits,
   agreement of the most likely next token, and mean KL(full precision || quantised) per token;
2. the demo's short fine-tune (`milora.train`, the demo's config plus ``init`` and
   ``quantization``: r = 16, 50 steps, batch 8, lr 2e-3);
3. held-out accuracy (greedy, the task's scorer) of the model as trained (the quantised
   residual + adapter, ``load_model(base, dir, quantization=...)``) and of the saved adapter on
   the full-precision base (what merging and serving give, ``load_model(base, dir)``).

Runs one mode at a time (each fine-tune takes minutes on 2 CPU cores); writes ``results.json``
and prints the README table. ``--init-only`` measures step 1 alone (a few minutes);
``--float32-reference pissa`` runs steps 2-3 without quantisation, for comparison.

    python benchmarks/quantized_init.py [--output runs/quantized] [--quantization nf4] [--steps 50] [--eval-size 100]
                                        [--init-only] [--float32-reference INITS]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from milora.adapter.load import load_model
from milora.demos.text import DEFAULT_TASK, DEFAULT_TASK_OPTIONS, demo_train_config, make_task, score
from milora.init import get_model, init_record
from milora.io import atomic_write_json, atomic_write_text
from milora.models import load_base_model
from milora.prompts import apply_chat_template
from milora.training.config import load_config
from milora.training.run import build_lora_config, train

INITS = ("lora", "pissa", "milora")


def probe_batch(tokenizer, held_out, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` held-out questions with their answers, in the chat template, right-padded."""
    texts = [apply_chat_template(tokenizer, [{"role": "user", "content": entry["question"]},
                                             {"role": "assistant", "content": str(entry["answer"])}], False)
             for entry in list(held_out)[:count]]
    tokenizer.padding_side = "right"
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logits(model, batch) -> torch.Tensor:
    """Logits at the non-padding positions (tokens x vocabulary), float64."""
    with torch.no_grad():
        output = model(**batch).logits.double()
    return output[batch["attention_mask"].bool()]


def output_errors(found: torch.Tensor, reference: torch.Tensor) -> dict:
    """Logits (tokens x vocabulary) of the quantised model at init against the full-precision model's."""
    log_p, log_q = reference.log_softmax(-1), found.log_softmax(-1)
    return {"output_error_at_init": float((found - reference).norm() / reference.norm()),
            "top1_agreement": float((found.argmax(-1) == reference.argmax(-1)).double().mean()),
            "mean_kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean())}


def init_errors(config: dict, batch, reference: torch.Tensor) -> dict:
    """The init report of one mode on a quantised base, and its output error against the full-precision model."""
    model, _ = load_base_model(None)
    start = time.perf_counter()
    peft_model = get_model(model, build_lora_config(load_config(config)), init=config["init"], seed=config["seed"],
                           quantization=config["quantization"], progress=False)
    seconds = time.perf_counter() - start
    found = logits(peft_model, batch)
    record = init_record(peft_model)
    targets = record.quantization["targets"]
    below = sum(entry["initial_share"] < entry["quantization_error_vs_weight"] for entry in targets)
    return {**{key: value for key, value in record.summary().items() if "quantization" in key or "share" in key},
            "weights_share_below_noise": below, "weights": len(targets), **output_errors(found, reference),
            "base_megabytes": peft_model.get_base_model().get_memory_footprint() / 2**20, "init_seconds": seconds}


def run_mode(init: str, args, held_out, batch, reference) -> dict:
    config = {**demo_train_config(args.output, max_steps=args.steps), "init": init, "quantization": args.quantization,
              "output_dir": str(Path(args.output) / f"{init}-{args.quantization}"), "report_to": "none"}
    result = {"init": init, **init_errors(config, batch, reference)}
    print(f"[{init}] init: {json.dumps(result)}", flush=True)
    if args.init_only:
        return result
    trained = train(config)
    result["train_seconds"] = trained.metrics["train"]["train_runtime"]
    result["loss_last"] = [entry["loss"] for entry in trained.metrics["loss_history"] if "loss" in entry][-1]
    base, tokenizer = load_base_model(None)
    as_trained = load_model(base, trained.adapter_dir, quantization=args.quantization)
    result["accuracy_quantized"] = score(as_trained, tokenizer, held_out, desc=f"{init}: quantised base")["accuracy"]
    base, tokenizer = load_base_model(None)
    full = load_model(base, trained.adapter_dir)
    result["accuracy_full_precision_base"] = score(full, tokenizer, held_out, desc=f"{init}: fp32 base")["accuracy"]
    print(f"[{init}] {json.dumps(result)}", flush=True)
    return result


def float32_reference(init: str, args, held_out) -> dict:
    """The same fine-tune without quantisation (the float32 reference of a row), scored on the same items."""
    config = {**demo_train_config(args.output, max_steps=args.steps), "init": init,
              "output_dir": str(Path(args.output) / f"{init}-float32"), "report_to": "none"}
    trained = train(config)
    base, tokenizer = load_base_model(None)
    accuracy = score(load_model(base, trained.adapter_dir), tokenizer, held_out, desc=f"{init}: float32")["accuracy"]
    return {"init": init, "accuracy": accuracy, "loss_last": trained.metrics["loss_history"][-1]["loss"],
            "train_seconds": trained.metrics["train"]["train_runtime"]}


def quantized_base_accuracy(args, held_out, tokenizer) -> float:
    """The quantised base model alone (what QLoRA starts from): every Linear layer but lm_head in ``quantization``."""
    from milora.init.quantize import quantize_model

    model, _ = load_base_model(None)
    quantize_model(model, args.quantization)
    return score(model, tokenizer, held_out, desc="quantised base")["accuracy"]


def table(results: list[dict], items: int) -> str:
    def se(p: float) -> float:
        return 100 * math.sqrt(p * (1 - p) / items)

    def accuracy(r: dict, key: str) -> str:
        return f"{r[key]:.0%} ± {se(r[key]):.0f}" if key in r else "–"

    lines = ["| init | mean quant. error ‖Q(W_res)−W_res‖/‖W_res‖ | same in units of ‖W‖ | adapter share ‖sB0A0‖/‖W‖ "
             "(mean / max) | weights with share < noise | output at init: logit error / top-1 agreement / mean KL "
             "| accuracy, quantised base + adapter | accuracy, full-precision base + saved adapter |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['init']} | {r['mean_quantization_error']:.4f} | {r['mean_quantization_error_vs_weight']:.4f} | "
            f"{r['mean_initial_share']:.2e} / {r['max_initial_share']:.2e} | "
            f"{r['weights_share_below_noise']} / {r['weights']} | "
            f"{r['output_error_at_init']:.3f} / {r['top1_agreement']:.0%} / {r['mean_kl']:.2f} | "
            f"{accuracy(r, 'accuracy_quantized')} | {accuracy(r, 'accuracy_full_precision_base')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/quantized")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "int8"])
    parser.add_argument("--inits", default=",".join(INITS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--probe", type=int, default=32, help="held-out items in the output-error probe")
    parser.add_argument("--init-only", action="store_true", help="measure the quantised inits only (no fine-tune)")
    parser.add_argument("--float32-reference", default=None, metavar="INITS",
                        help="only fine-tune these inits (comma-separated) without quantisation, as a reference")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    train_records, held_out = make_task(DEFAULT_TASK, DEFAULT_TASK_OPTIONS, 400, args.eval_size, seed=0)
    atomic_write_text(output / "train.jsonl", "".join(json.dumps(record) + "\n" for record in train_records))
    if args.float32_reference:
        references = [float32_reference(init, args, held_out) for init in args.float32_reference.split(",")]
        atomic_write_json(output / "float32.json", references)
        print(json.dumps(references))
        return
    model, tokenizer = load_base_model(None)
    batch = probe_batch(tokenizer, held_out, args.probe)
    reference = logits(model, batch)
    baselines = {"full_precision_base_megabytes": model.get_memory_footprint() / 2**20}
    if not args.init_only:
        baselines["full_precision_base"] = score(model, tokenizer, held_out, desc="fp32 base")["accuracy"]
        del model
        baselines["quantized_base"] = quantized_base_accuracy(args, held_out, tokenizer)
    print(f"baselines: {baselines}", flush=True)
    report = {"quantization": args.quantization, "steps": args.steps, "held_out_items": len(held_out),
              "probe_items": args.probe, "baselines": baselines, "results": []}
    for init in args.inits.split(","):
        report["results"].append(run_mode(init, args, held_out, batch, reference))
        report["total_seconds"] = time.perf_counter() - start
        atomic_write_json(output / ("init.json" if args.init_only else "results.json"), report)  # after each mode
    results = report["results"]
    print(table(results, len(held_out)))
    print(f"baselines (no adapter): {baselines}; total {report['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
