"""The embedded end-to-end demo (`milora demo`, `make demo`): MiLoRA on SmolLM2-135M, on CPU.

1. generates a task from `reasoning-gym` (default: `chain_sum`, one-digit sums and differences
   such as "4 - 7 ="), disjoint train and held-out questions, written as chat ``messages`` JSONL;
2. scores the base model on the held-out items (chat prompt, greedy decoding, the task's own
   scorer; an item counts as correct when the scorer gives it full marks);
3. trains a MiLoRA adapter with `milora.train` (the same code path as `milora train`);
4. reloads the saved adapter onto a fresh base with `milora.load_model`, scores it again and
   prints a report: accuracy before/after, loss curve summary, time, adapter location.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from milora.constants import PAPER_TARGETS
from milora.errors import ConfigError, MiloraError
from milora.io import atomic_write_json, atomic_write_text

DEFAULT_TASK = "chain_sum"
DEFAULT_TASK_OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def make_task(task: str, options: dict[str, Any], train_size: int, eval_size: int, seed: int):
    """``train_size`` train records (chat messages) and ``eval_size`` held-out (question, entry) pairs.

    Both are i.i.d. draws from the task's generator (seed ``seed`` for training, ``seed + 1`` held
    out), so a small problem space repeats questions within each (the default one-digit sums have
    200); a training draw whose question is held out is skipped, so no question is in both.
    reasoning-gym's item i depends on (seed, i) only, so the training stream is extended until it
    has ``train_size`` records.
    """
    try:
        import reasoning_gym
    except ImportError as error:
        raise MiloraError("The demo's task data comes from `reasoning-gym`: "
                          "run `pip install reasoning-gym`.") from error
    held_out = reasoning_gym.create_dataset(task, size=eval_size, seed=seed + 1, **options)
    held_out_questions = {entry["question"] for entry in held_out}
    draws = train_size + eval_size
    while True:
        pool = reasoning_gym.create_dataset(task, size=draws, seed=seed, **options)
        kept = [entry for entry in pool if entry["question"] not in held_out_questions]
        if len(kept) >= train_size:
            break
        if draws >= 20 * (train_size + eval_size):
            raise ConfigError(f"Only {len(kept)} of {draws} draws of {task!r} {options} fall outside the "
                              f"{len(held_out_questions)} held-out questions, fewer than train_size={train_size}: "
                              "the task's problem space is too small for this split; lower eval_size or widen "
                              "the task options.")
        draws *= 2
    train = [
        {"messages": [
            {"role": "user", "content": entry["question"]},
            {"role": "assistant", "content": str(entry["answer"])},
        ]}
        for entry in kept[:train_size]
    ]
    return train, held_out


def score(model, tokenizer, dataset, max_new_tokens: int = 8, batch_size: int = 32, desc: str = "evaluating") -> dict:
    """Greedy answers to every item of a reasoning-gym dataset, scored by the dataset itself.

    Prompts are the user turn in the chat template (as the demo trains); the answer is the first
    line of the output. Returns ``{"accuracy", "mean_score", "items": [{"question", "output",
    "gold", "score"}]}``; accuracy counts items with full marks.
    """
    from milora.eval.generation import generate
    from milora.prompts import apply_chat_template

    entries = list(dataset)
    prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": e["question"]}], True) for e in entries]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       add_special_tokens=False, desc=desc)
    items = []
    for entry, output in zip(entries, outputs, strict=True):
        answer = output.strip().split("\n")[0].strip()
        items.append({"question": entry["question"], "output": output, "gold": entry["answer"],
                      "score": float(dataset.score_answer(answer, entry))})
    return {
        "accuracy": sum(item["score"] >= 1.0 for item in items) / len(items),
        "mean_score": sum(item["score"] for item in items) / len(items),
        "items": items,
    }


def demo_train_config(
    output_dir: str | Path, max_steps: int = 50, batch_size: int = 8, learning_rate: float = 2e-3, lora_rank: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """The demo's `milora train` config (also shipped as recipes/demo.yaml): data in ``output_dir/train.jsonl``."""
    return {
        "dataset": str(Path(output_dir) / "train.jsonl"),
        "template": "chat",
        "cutoff_len": 128,
        "init": "milora",
        "lora_rank": lora_rank,
        "lora_dropout": 0.0,
        "lora_target": ",".join(PAPER_TARGETS),
        "learning_rate": learning_rate,
        "warmup_steps": max(1, max_steps // 10),
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "logging_steps": 5,
        "save_steps": max_steps,
        "seed": seed,
        "output_dir": str(Path(output_dir) / "adapter"),
        "overwrite_output_dir": True,
    }


def run_demo(
    output_dir: str | Path = "runs/demo",
    task: str = DEFAULT_TASK,
    task_options: dict[str, Any] | None = None,
    train_size: int = 400,
    eval_size: int = 100,
    max_steps: int = 50,
    batch_size: int = 8,
    learning_rate: float = 2e-3,
    lora_rank: int = 16,
    seed: int = 0,
) -> dict:
    """Run the demo end to end (see module docstring); returns the report and writes it as ``report.json``."""
    from milora.adapter.load import load_model
    from milora.models import load_base_model
    from milora.training.run import train

    for name, value in (("train_size", train_size), ("eval_size", eval_size), ("max_steps", max_steps),
                        ("batch_size", batch_size), ("lora_rank", lora_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    start = time.perf_counter()
    options = DEFAULT_TASK_OPTIONS if task_options is None and task == DEFAULT_TASK else (task_options or {})
    train_records, held_out = make_task(task, options, train_size, eval_size, seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "train.jsonl", "".join(json.dumps(record) + "\n" for record in train_records))

    model, tokenizer = load_base_model(None)
    before = score(model, tokenizer, held_out, desc="held-out, base model")
    del model

    result = train(
        demo_train_config(output_dir, max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate,
                          lora_rank=lora_rank, seed=seed)
    )
    base, tokenizer = load_base_model(None)
    tuned = load_model(base, result.adapter_dir)
    after = score(tuned, tokenizer, held_out, desc="held-out, MiLoRA model")

    curve = [(entry["step"], entry["loss"]) for entry in result.metrics["loss_history"] if "loss" in entry]
    losses = [loss for _, loss in curve]
    report = {
        "task": task,
        "task_options": options,
        "train_examples": len(train_records),
        "train_distinct_questions": len({record["messages"][0]["content"] for record in train_records}),
        "held_out_items": len(held_out),
        "held_out_distinct_questions": len({entry["question"] for entry in held_out}),
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "mean_score_before": before["mean_score"],
        "mean_score_after": after["mean_score"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_min": min(losses),
        "loss_curve": curve,
        "steps": result.metrics["global_step"],
        "train_seconds": result.metrics["train"].get("train_runtime"),
        "total_seconds": time.perf_counter() - start,
        "adapter_dir": str(result.adapter_dir),
        "examples_after": after["items"][:5],
    }
    atomic_write_json(output_dir / "report.json", report)
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [
        "",
        f"MiLoRA demo: SmolLM2-135M-Instruct on reasoning-gym '{report['task']}' {report['task_options']}",
        (
            f"  held-out accuracy: {report['accuracy_before']:.1%} before -> {report['accuracy_after']:.1%} after "
            f"({report['held_out_items']} items, {report['held_out_distinct_questions']} distinct, greedy, "
            "the task's scorer; "
            f"mean score {report['mean_score_before']:.3f} -> {report['mean_score_after']:.3f})"
        ),
        (
            f"  training: {report['steps']} steps on {report['train_examples']} examples "
            f"({report['train_distinct_questions']} distinct questions, none held out), "
            f"loss {report['loss_first']:.3f} -> {report['loss_last']:.3f} (min {report['loss_min']:.3f}), "
            f"{report['train_seconds']:.0f} s"
        ),
        "  loss curve: " + ", ".join(f"step {step}: {loss:.3f}" for step, loss in report["loss_curve"]),
        f"  total time: {report['total_seconds']:.0f} s",
        f"  adapter: {report['adapter_dir']}  (milora.load_model(base, dir), or plain PEFT on the original base)",
    ]
    for item in report["examples_after"][:3]:
        lines.append(f"  e.g. {question_tail(item['question'])!r} -> {item['output'].strip()!r} (gold {item['gold']})")
    return "\n".join(lines)


def question_tail(text: str, width: int = 60) -> str:
    """The end of ``text`` in at most ``width`` characters (plus a leading "..." when cut), cut at a
    word boundary, never inside a word."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    tail = text[-width:]
    start = tail.find(" ") + 1 if not text[-width - 1].isspace() else 0
    return "..." + tail[start:]
