"""DPO on the embedded SmolLM2-135M from a MiLoRA start: held-out preference and answer accuracy, before and after.

The task is the embedded demo's (reasoning-gym ``chain_sum``, one-digit sums such as "4 - 7 ="),
train and held-out questions disjoint (`milora.demos.text.make_task`). A preference pair is the
question (a chat user turn), the correct answer (chosen) and a wrong one, the answer plus a
nonzero offset in [-3, 3] drawn with the seed (rejected). Per seed the run trains
``recipes/dpo_demo.yaml`` (through `milora.train`, TRL's DPOTrainer) and measures on the held-out
items, before (the base model) and after (the saved adapter reloaded with `milora.load_model`):

- pair accuracy: the share of held-out pairs where log p(chosen) > log p(rejected);
- answer accuracy: greedy answers scored by the task itself (as `milora demo` does);
- reward accuracy (after only): the share of held-out pairs whose implicit DPO reward,
  log p(answer) - log p_base(answer), is higher for the chosen answer (TRL's ``rewards/accuracies``).

Prints per seed and the mean change over seeds with a Student t 95% interval.

    python benchmarks/preference_demo.py [--seeds 0 1 2] [--train 200] [--eval 100] [--steps 30] [--out runs/dpo_demo]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import yaml

from milora import load_base_model, load_model, train
from milora.comparison.stats import mean_interval
from milora.demos.text import DEFAULT_TASK, DEFAULT_TASK_OPTIONS, make_task, score
from milora.eval.generation import continuation_logprobs
from milora.prompts import apply_chat_template

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "dpo_demo.yaml"


def pair(question: str, answer, rng: random.Random) -> dict:
    wrong = int(answer) + rng.choice([-3, -2, -1, 1, 2, 3])
    return {"prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": str(answer)}],
            "rejected": [{"role": "assistant", "content": str(wrong)}]}


def pair_logprobs(model, tokenizer, pairs: list[dict]) -> list[tuple[float, float]]:
    """(log p(chosen), log p(rejected)) of each pair's answer after its chat prompt."""
    contexts = [apply_chat_template(tokenizer, p["prompt"], True) for p in pairs]
    requests = [(context, p[side][0]["content"])
                for context, p in zip(contexts, pairs, strict=True) for side in ("chosen", "rejected")]
    logps = continuation_logprobs(model, tokenizer, requests, progress=False)
    return [(logps[2 * i], logps[2 * i + 1]) for i in range(len(pairs))]


def measure(model, tokenizer, eval_pairs: list[dict], held_out, reference=None) -> tuple[dict, list]:
    """Pair accuracy, answer accuracy and, against ``reference`` (the base's pair log-probabilities),
    reward accuracy: the share of pairs whose implicit DPO reward log p - log p_ref is higher for chosen."""
    logps = pair_logprobs(model, tokenizer, eval_pairs)
    measured = {"pairs": sum(c > r for c, r in logps) / len(logps),
                "answers": score(model, tokenizer, held_out)["accuracy"]}
    if reference is not None:
        measured["rewards"] = sum((c - rc) > (r - rr) for (c, r), (rc, rr) in zip(logps, reference, strict=True)
                                  ) / len(logps)
    return measured, logps


def run_seed(seed: int, args) -> dict:
    out = Path(args.out) / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_records, held_out = make_task(DEFAULT_TASK, DEFAULT_TASK_OPTIONS, args.train, args.eval, seed)
    train_pairs = [pair(r["messages"][0]["content"], r["messages"][1]["content"], rng) for r in train_records]
    eval_pairs = [pair(e["question"], e["answer"], rng) for e in held_out]
    (out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train_pairs))
    base, tokenizer = load_base_model(None)
    before, base_logps = measure(base, tokenizer, eval_pairs, held_out)
    config = {**yaml.safe_load(RECIPE.read_text()), "dataset": str(out / "pairs.jsonl"),
              "output_dir": str(out / "adapter"), "seed": seed, "max_steps": args.steps}
    result = train(config)
    model = load_model(base, result.adapter_dir)
    after, _ = measure(model, tokenizer, eval_pairs, held_out, reference=base_logps)
    return {"seed": seed, "before": before, "after": after, "wall_seconds": result.metrics["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/dpo_demo")
    args = parser.parse_args()
    runs = [run_seed(seed, args) for seed in args.seeds]
    for run in runs:
        print(json.dumps(run))
    rewards = mean_interval([r["after"]["rewards"] for r in runs])
    bounds = f", 95% interval [{rewards.low:.3f}, {rewards.high:.3f}]" if rewards.low is not None else ""
    print(f"held-out reward accuracy after (0 before: the reward is 0 for both answers): {rewards.mean:.3f}{bounds} "
          f"({rewards.method})")
    for metric in ("pairs", "answers"):
        change = mean_interval([r["after"][metric] - r["before"][metric] for r in runs])
        bounds = f", 95% interval [{change.low:+.3f}, {change.high:+.3f}]" if change.low is not None else ""
        bounds += f" ({change.method})"
        print(f"{metric} accuracy: before {sum(r['before'][metric] for r in runs) / len(runs):.3f}, after "
              f"{sum(r['after'][metric] for r in runs) / len(runs):.3f}; change {change.mean:+.3f}{bounds}")


if __name__ == "__main__":
    main()
