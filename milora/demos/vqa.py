"""The embedded vision-language miniature (`milora demo-vqa`): MiLoRA visual instruction tuning on CPU.

1. assembles a LLaVA-architecture model (`milora.demos.llava`): the embedded SmolLM2-135M-Instruct
   as language model, a small random CLIP vision tower for 64 x 64 images (16 x 16 patches:
   16 image tokens), a random projector;
2. writes easy-VQA (the PyPI package ``easy-vqa``, MIT: 38,575 training and 9,673 test questions
   on 64 x 64 images of one coloured shape, 13 answers) as LLaVA-format training records (a
   seeded subset) and `vqa` test records (a seeded subset), LLaVA-1.5's short-answer prompt;
3. scores the assembled model on the test questions (`milora.eval` task ``vqa``, greedy), and
   two baselines: the majority answer of the training set ("yes"), and the majority answer of
   the question's type (yes/no, shape, colour) in the training set;
4. trains with `milora.train` (the `milora train` code path; recipes/vqa_demo.yaml): MiLoRA
   r = 16 on the language model's q, k, v, up, down, the projector trained in full
   (``modules_to_save``), the vision tower frozen;
5. reloads the adapter onto a fresh base with `milora.load_model`, scores again and reports
   accuracy with its binomial standard error sqrt(p (1 - p) / n).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from milora.demos.text import demo_train_config
from milora.errors import ConfigError, MiloraError
from milora.io import atomic_write_json, atomic_write_text
from milora.prompts import image_question

MINIATURE = {"image_size": 64, "patch_size": 16, "vision_hidden": 192, "vision_layers": 2, "vision_heads": 4}
YES_NO = ("yes", "no")


def easy_vqa_folder() -> Path:
    try:
        import easy_vqa
    except ImportError as error:
        raise MiloraError("The vision demo's data comes from `easy-vqa`: run `pip install easy-vqa`.") from error
    return Path(easy_vqa.__file__).parent / "data"


def answer_type(answer: str, shapes: set[str]) -> str:
    return "yes/no" if answer in YES_NO else "shape" if answer in shapes else "colour"


def make_data(output_dir: Path, train_size: int, eval_size: int, seed: int) -> dict[str, Any]:
    """Write ``train.json`` (LLaVA format) and ``test.jsonl`` (vqa records) under ``output_dir``
    (created once the sizes are known to fit easy-vqa's questions); images stay in the easy-vqa
    package (``image_folder``). Returns the baselines' answers."""
    import easy_vqa

    folder = easy_vqa_folder()
    questions, answers, images = easy_vqa.get_train_questions()
    test_q, test_a, test_images = easy_vqa.get_test_questions()
    for name, size, available in (("train_size", train_size, len(questions)), ("eval_size", eval_size, len(test_q))):
        if size > available:
            raise ConfigError(f"{name}={size} exceeds the {available} questions easy-vqa has for it; "
                              f"choose at most {available}.")
    output_dir.mkdir(parents=True, exist_ok=True)
    chosen = random.Random(seed).sample(range(len(questions)), train_size)
    train = [{"id": f"train-{i}", "image": f"train/images/{images[i]}.png",
              "conversations": [{"from": "human", "value": image_question(questions[i])},
                                {"from": "gpt", "value": answers[i]}]} for i in chosen]
    held_out = random.Random(seed + 1).sample(range(len(test_q)), eval_size)
    test = [{"image": f"test/images/{test_images[i]}.png", "question": test_q[i], "answer": test_a[i]}
            for i in held_out]
    atomic_write_text(output_dir / "train.json", json.dumps(train))
    atomic_write_text(output_dir / "test.jsonl", "".join(json.dumps(record) + "\n" for record in test))
    shapes = {"circle", "rectangle", "triangle"}
    counts = Counter(answers[i] for i in chosen)
    by_type = {kind: max((a for a in counts if answer_type(a, shapes) == kind), key=counts.get)
               for kind in ("yes/no", "shape", "colour")}
    return {"image_folder": str(folder), "majority": counts.most_common(1)[0][0], "majority_by_type": by_type,
            "test_answers": [record["answer"] for record in test], "shapes": shapes}


def vqa_demo_config(output_dir: str | Path, max_steps: int = 120, batch_size: int = 8, learning_rate: float = 2e-3,
                    lora_rank: int = 16, seed: int = 0, image_folder: str | None = None) -> dict[str, Any]:
    """The miniature's `milora train` config (also shipped as recipes/vqa_demo.yaml): the text demo's,
    on the saved tiny LLaVA, with its images and the projector trained in full."""
    output_dir = Path(output_dir)
    return {
        **demo_train_config(output_dir, max_steps, batch_size, learning_rate, lora_rank, seed),
        "model": str(output_dir / "model"),
        "dataset": str(output_dir / "train.json"),
        "image_folder": image_folder or str(easy_vqa_folder()),
        "modules_to_save": "multi_modal_projector",
        "logging_steps": 10,
    }


def binomial(correct: int, n: int) -> dict[str, float]:
    p = correct / n
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / n), "correct": correct, "n": n}


def _score(model, processor, output_dir: Path, image_folder: str, label: str) -> dict:
    from milora.eval import evaluate

    result = evaluate(model, processor, "vqa", str(output_dir / "test.jsonl"), batch_size=16, max_new_tokens=4,
                      image_folder=image_folder, label=label)
    atomic_write_json(output_dir / f"{label}-vqa.json", result)
    return result


def run_vqa_demo(output_dir: str | Path = "runs/vqa_demo", train_size: int = 2000, eval_size: int = 400,
                 max_steps: int = 120, batch_size: int = 8, learning_rate: float = 2e-3, lora_rank: int = 16,
                 seed: int = 0) -> dict:
    """Run the miniature end to end (see module docstring); returns the report, also written as ``report.json``."""
    from milora.adapter.load import load_model
    from milora.demos.llava import assemble_llava
    from milora.models import load_base_model
    from milora.training.run import train

    for name, value in (("train_size", train_size), ("eval_size", eval_size), ("max_steps", max_steps),
                        ("batch_size", batch_size), ("lora_rank", lora_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    start = time.perf_counter()
    output_dir = Path(output_dir)
    data = make_data(output_dir, train_size, eval_size, seed)
    if not (output_dir / "model" / "config.json").is_file():
        assemble_llava(None, output_dir / "model", seed=seed, **MINIATURE)

    model, processor = load_base_model(str(output_dir / "model"))
    before = _score(model, processor, output_dir, data["image_folder"], "base")
    del model
    config = vqa_demo_config(output_dir, max_steps, batch_size, learning_rate, lora_rank, seed, data["image_folder"])
    result = train(config)
    base, processor = load_base_model(str(output_dir / "model"))
    after = _score(load_model(base, result.adapter_dir), processor, output_dir, data["image_folder"], "milora")
    report = _report(data, before, after, result, start, train_size, max_steps)
    atomic_write_json(output_dir / "report.json", report)
    print(format_vqa_report(report))
    return report


def _report(data, before, after, result, start, train_size, max_steps) -> dict:
    golds = data["test_answers"]
    n = len(golds)
    by_type = data["majority_by_type"]
    kinds = [answer_type(gold, data["shapes"]) for gold in golds]

    def per_type(items) -> dict[str, dict]:
        return {kind: binomial(sum(i["correct"] for i, k in zip(items, kinds, strict=True) if k == kind),
                               kinds.count(kind))
                for kind in sorted(set(kinds))}

    losses = [entry["loss"] for entry in result.metrics["loss_history"] if "loss" in entry]
    return {
        "train_questions": train_size, "test_questions": n, "steps": max_steps,
        "majority_baseline": {"answer": data["majority"], **binomial(sum(g == data["majority"] for g in golds), n)},
        "type_majority_baseline": {"answers": by_type,
                                   **binomial(sum(g == by_type[k] for g, k in zip(golds, kinds, strict=True)), n)},
        "before": binomial(sum(i["correct"] for i in before["items"]), n),
        "after": binomial(sum(i["correct"] for i in after["items"]), n),
        "after_by_type": per_type(after["items"]),
        "before_by_type": per_type(before["items"]),
        "loss_first": losses[0], "loss_last": losses[-1],
        "train_seconds": result.metrics["train"].get("train_runtime"),
        "total_seconds": time.perf_counter() - start,
        "adapter_dir": str(result.adapter_dir),
        "examples_after": [{k: i[k] for k in ("output", "gold")} for i in after["items"][:5]],
    }


def format_vqa_report(report: dict) -> str:
    def pct(entry: dict) -> str:
        return f"{entry['accuracy']:.1%} ± {entry['stderr']:.1%}"

    lines = [
        "",
        "MiLoRA vision demo: LLaVA(SmolLM2-135M-Instruct + random CLIP tower) on easy-VQA",
        f"  test questions: {report['test_questions']} (accuracy ± binomial standard error, normalised exact match)",
        f"  majority answer ({report['majority_baseline']['answer']!r}): {pct(report['majority_baseline'])}",
        f"  question-type majority {report['type_majority_baseline']['answers']}: "
        f"{pct(report['type_majority_baseline'])}",
        f"  assembled model before training: {pct(report['before'])}",
        f"  after MiLoRA ({report['steps']} steps on {report['train_questions']} questions): {pct(report['after'])}",
        "  after, by type: " + ", ".join(f"{k} {pct(v)} (n={v['n']})" for k, v in report["after_by_type"].items()),
        f"  loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}; training {report['train_seconds']:.0f} s, "
        f"total {report['total_seconds']:.0f} s",
        f"  adapter: {report['adapter_dir']}",
    ]
    return "\n".join(lines)
