"""Evaluation of base models and MiLoRA adapters: the paper's benchmarks, forgetting and lm-eval.

Tasks (``evaluate(model, tokenizer, task, data, ...)``):

- ``gsm8k``: math word problems, GSM8K JSONL (``question``/``answer`` with ``#### N``) or the
  LLM-Adapters math format (``instruction``/``input``/``output``/``answer``, a number or, for
  AQuA items, a letter A-E); the hub's ``openai/gsm8k`` test split when ``data`` is None.
- ``math``: Hendrycks MATH (``problem``/``solution``, gold = last ``\\boxed{}``, or an ``answer``
  field); JSON, JSONL or a directory of them; ``EleutherAI/hendrycks_math`` when ``data`` is None.
- ``commonsense``: LLM-Adapters commonsense files (a file, or a directory of ``<task>/test.json``);
  scorer ``generate`` (the paper's protocol) or ``loglik`` (log-likelihood of each label option).
- ``forgetting``: the forgetting loss against the base model and perplexity on general text
  (see ``milora.forgetting_text`` for sources).
- ``lm-eval:<task,...>``: EleutherAI lm-evaluation-harness tasks on the loaded model;
  ``data`` is then an ``include_path`` of local task YAMLs.

Protocol of the paper (LLM-Adapters for commonsense, MetaMath/PiSSA for math): Alpaca prompt,
for math ending in "### Response: Let's think step by step.", greedy decoding, the MetaMath
stop strings for math, 32 new tokens for commonsense. Generation is batched with left padding
and the KV cache; prompts are sorted by length so batches hold similar lengths.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from milora import grading
from milora.grading import DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
MATH_RESPONSE_START = "### Response: Let's think step by step."
MATH_STOP_STRINGS = ("Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT",
                     "Instruction:", "Instruction", "Response:", "Response")
"""Stop strings of the MetaMath/PiSSA math evaluation used by the paper."""
COMMONSENSE_ANSWER_PREFIX = "the correct answer is"
"""How LLM-Adapters training targets start ("the correct answer is answer2"); the loglik scorer
scores " <label>" after it."""

DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 512, "math": 512, "commonsense": 32}
ACCURACY_TASKS = ("gsm8k", "math", "commonsense")
SCORERS = ("generate", "loglik")
_HUB_DEFAULTS = {
    "gsm8k": [("openai/gsm8k", "main")],
    "math": [("EleutherAI/hendrycks_math", subject) for subject in (
        "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
        "number_theory", "prealgebra", "precalculus")],
}
_SPLIT_SUFFIXES = ("_test", "-test", "_train", "-train", "_validation", "_dev")
PAPER_COLUMNS = {
    "boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "siqa": "SIQA", "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA",
    "gsm8k": "GSM8K", "math": "MATH",
}
"""Column names of the paper's tables, in the paper's order."""


@dataclass
class Example:
    """One benchmark item: where it comes from, its prompt fields, its gold answer."""

    dataset: str
    instruction: str
    input: str
    gold: Any
    options: tuple[str, ...] = ()


# ---------------------------------------------------------------- data


def _read_records(path: Path) -> list[dict]:
    """Records of a JSON list/object or JSONL file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSONL ({error}).") from error
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}); JSONL files must end in .jsonl.") from error
    records = [records] if isinstance(records, dict) else records
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a JSON list of objects (or one object).")
    return records


def dataset_name(path: Path) -> str:
    """``ARC-Easy/test.json`` -> ``ARC-Easy``, ``gsm8k_test.jsonl`` -> ``gsm8k``."""
    stem = path.stem
    if stem in {"test", "train", "validation", "dev"}:
        return path.parent.name
    for suffix in _SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _data_sources(task: str, data: str | Path) -> list[tuple[str, list[Path]]]:
    """``(dataset name, files)`` pairs: one per file, per ``<name>/test.json`` of a directory,
    or (``math``) one for all JSON/JSONL files under a directory."""
    path = Path(data)
    if path.is_file():
        return [(dataset_name(path), [path])]
    if not path.is_dir():
        raise FileNotFoundError(f"Data path {path} does not exist.")
    if task == "math":
        files = sorted(p for p in path.rglob("*") if p.suffix in {".json", ".jsonl"})
        if not files:
            raise DataError(f"{path} holds no .json or .jsonl files of MATH problems.")
        return [("math", files)]
    tests = sorted(path.glob("*/test.json"))
    files = tests or sorted(p for p in path.iterdir() if p.suffix in {".json", ".jsonl"})
    if not files:
        raise DataError(f"{path} holds neither <task>/test.json files nor .json/.jsonl files.")
    return [(dataset_name(f), [f]) for f in files]


def _hub_records(task: str, data: str | None) -> tuple[str, list[dict]]:
    import datasets

    sources = _HUB_DEFAULTS[task] if data is None else [tuple((data.split(":", 1) + [None])[:2])]
    records = []
    for repo, config in sources:
        try:
            records.extend(datasets.load_dataset(repo, config, split="test"))
        except Exception as error:
            raise DataError(
                f"{repo!r} is not a local path and could not be loaded from the hub "
                f"({type(error).__name__}: {error}); offline, pass a local file or directory with --data."
            ) from error
    return (task if data is None else data.split("/")[-1].split(":")[0]), records


def _field(record: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        if isinstance(record.get(name), str):
            return record[name]
    raise DataError(f"{where}: no {' / '.join(f'`{n}`' for n in names)} field (keys: {sorted(record)}).")


def _examples(task: str, name: str, records: list[dict], where: str) -> list[Example]:
    """Examples of one dataset; raises DataError on items whose gold answer does not parse."""
    examples = []
    for index, record in enumerate(records):
        at = f"{where} item {index}"
        question = _field(record, ("question", "instruction", "problem", "query"), at)
        extra = record.get("input") or ""
        if task == "gsm8k":
            if "answer" not in record:
                raise DataError(f"{at}: no `answer` field with the gold number.")
            try:
                gold = grading.gold_word_problem_answer(record["answer"])
            except DataError as error:
                raise DataError(f"{at}: {error}") from error
        elif task == "math":
            answer = record.get("answer")
            gold = answer if isinstance(answer, str) and answer.strip() else grading.last_boxed(
                _field(record, ("solution", "output"), at))
            if gold is None:
                raise DataError(f"{at}: the solution has no \\boxed{{}} answer and there is no `answer` field.")
        else:
            gold = str(_field(record, ("answer",), at)).strip().lower()
        examples.append(Example(name, question, extra, gold))
    if task == "commonsense" and examples:
        label_set = grading.infer_label_set([e.gold for e in examples], [e.instruction for e in examples])
        labels = grading.LABEL_SETS[label_set]
        for example in examples:
            offered = [o for o in grading.answer_format_options(example.instruction) if o in labels]
            example.options = tuple(offered or labels)
    return examples


def load_examples(task: str, data: str | Path | None = None, limit: int | None = None) -> tuple[list[Example], str]:
    """The examples of a benchmark task (``limit`` per dataset) and a description of the source."""
    if task not in ACCURACY_TASKS:
        raise DataError(f"Unknown benchmark task {task!r}: choose one of {', '.join(ACCURACY_TASKS)}.")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1 (got {limit}).")
    if data is None and task not in _HUB_DEFAULTS:
        raise DataError("The commonsense task needs --data: an LLM-Adapters file or a directory of <task>/test.json.")
    hub_name = data is not None and not Path(data).exists() and Path(data).suffix not in {".json", ".jsonl"}
    if data is None or hub_name and task in _HUB_DEFAULTS:
        name, records = _hub_records(task, None if data is None else str(data))
        return _examples(task, name, records[:limit], f"hub:{data or name}"), f"hub:{data or name}"
    examples = []
    for name, files in _data_sources(task, data):
        taken: list[Example] = []
        for file in files:
            if limit is not None and len(taken) >= limit:
                break
            records = _read_records(file)
            taken += _examples(task, name, records if limit is None else records[:limit - len(taken)], str(file))
        examples += taken
    if not examples:
        raise DataError(f"{data} holds no examples.")
    return examples, str(data)


def build_prompt(example: Example, task: str) -> str:
    """The paper's Alpaca prompt; for math tasks it ends in "### Response: Let's think step by step."."""
    template = ALPACA_PROMPT_WITH_INPUT if example.input else ALPACA_PROMPT
    prompt = template.format(instruction=example.instruction, input=example.input)
    if task in ("gsm8k", "math"):
        prompt = prompt[: -len("### Response:\n")] + MATH_RESPONSE_START
    return prompt


# ---------------------------------------------------------------- model calls


@contextmanager
def _padding_side(tokenizer, side: str):
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _truncate_at_stop(text: str, stop_strings) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8,
             stop_strings: tuple[str, ...] = (), progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy completions of ``prompts`` (batched, left padding, KV cache), cut at the first stop string."""
    if tokenizer.pad_token_id is None:
        raise DataError("The tokenizer has no pad token: set `tokenizer.pad_token = tokenizer.eos_token`.")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos = sorted(set(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
    outputs: list[str] = [""] * len(prompts)
    with _padding_side(tokenizer, "left"), torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            batch = order[start:start + batch_size]
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(_device(model))
            sequences = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None,
                top_p=None, top_k=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                stop_strings=list(stop_strings) or None, tokenizer=tokenizer if stop_strings else None,
            )
            for index, row in zip(batch, sequences[:, inputs["input_ids"].shape[1]:]):
                outputs[index] = _truncate_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop_strings)
    return outputs


def continuation_logprobs(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 8,
                          progress: bool = True, desc: str = "loglik") -> list[float]:
    """Sum of log-probabilities of each continuation given its context (lm-eval's encoding:
    the continuation's tokens are those of ``context + continuation`` after the context's)."""
    pairs = []
    for context, continuation in requests:
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        if len(whole) <= len(context_ids):
            raise DataError(f"The continuation {continuation!r} adds no tokens to its context.")
        pairs.append((whole, len(whole) - len(context_ids)))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]), reverse=True)
    scores = [0.0] * len(pairs)
    with _padding_side(tokenizer, "right"), torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            batch = order[start:start + batch_size]
            inputs = tokenizer.pad({"input_ids": [pairs[i][0] for i in batch]}, return_tensors="pt").to(_device(model))
            logits = model(**inputs).logits
            for row, index in enumerate(batch):
                ids, count = pairs[index]
                logprobs = logits[row, len(ids) - count - 1:len(ids) - 1].float().log_softmax(-1)
                targets = torch.tensor(ids[-count:], device=logprobs.device)
                scores[index] = logprobs[torch.arange(count, device=logprobs.device), targets].sum().item()
    return scores


# ---------------------------------------------------------------- benchmark tasks


def _grade(task: str, example: Example, output: str) -> tuple[Any, bool]:
    if task == "gsm8k":
        return grading.word_problem_correct(output, example.gold)
    if task == "math":
        prediction = grading.extract_math_answer(output)
        return prediction, grading.math_answers_equivalent(prediction, example.gold)
    prediction = grading.extract_label(output, grading.LABEL_SETS[_label_set_name(example)])
    return prediction, prediction == example.gold


def _label_set_name(example: Example) -> str:
    return next(name for name, labels in grading.LABEL_SETS.items() if set(example.options) <= set(labels))


def _benchmark(model, tokenizer, task: str, examples: list[Example], *, scorer: str, batch_size: int,
               max_new_tokens: int, progress: bool) -> list[dict]:
    prompts = [build_prompt(example, task) for example in examples]
    items = []
    if scorer == "loglik":
        requests = [(prompt + COMMONSENSE_ANSWER_PREFIX, " " + option)
                    for prompt, example in zip(prompts, examples) for option in example.options]
        scores = iter(continuation_logprobs(model, tokenizer, requests, batch_size=batch_size, progress=progress))
        for prompt, example in zip(prompts, examples):
            loglik = {option: next(scores) for option in example.options}
            prediction = max(loglik, key=loglik.get)
            items.append({"dataset": example.dataset, "prompt": prompt,
                          "output": f"{COMMONSENSE_ANSWER_PREFIX} {prediction}", "prediction": prediction,
                          "gold": example.gold, "correct": prediction == example.gold, "loglik": loglik})
        return items
    stops = MATH_STOP_STRINGS if task in ("gsm8k", "math") else ()
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       stop_strings=stops, progress=progress, desc=task)
    for prompt, example, output in zip(prompts, examples, outputs):
        prediction, correct = _grade(task, example, output)
        items.append({"dataset": example.dataset, "prompt": prompt, "output": output,
                      "prediction": prediction, "gold": example.gold, "correct": correct})
    return items


def _accuracies(items: list[dict]) -> dict[str, float]:
    names = list(dict.fromkeys(item["dataset"] for item in items))
    return {name: sum(i["correct"] for i in items if i["dataset"] == name) / sum(i["dataset"] == name for i in items)
            for name in names}


# ---------------------------------------------------------------- forgetting


def _windows(tokenizer, documents: list[str], max_length: int, limit: int | None):
    """Consecutive windows of ``max_length`` tokens over the documents joined by blank lines."""
    buffer: list[int] = []
    count = 0
    for document in documents:
        buffer += tokenizer(document + "\n\n", add_special_tokens=False)["input_ids"]
        while len(buffer) >= max_length:
            yield buffer[:max_length]
            buffer = buffer[max_length:]
            count += 1
            if limit is not None and count >= limit:
                return
    if len(buffer) > 1:
        yield buffer


def forgetting(model, tokenizer, documents: list[str], *, base_model=None, max_length: int = 1024,
               limit: int | None = None, batch_size: int = 8, progress: bool = True) -> tuple[dict, list[dict]]:
    """Forgetting of ``model`` relative to ``base_model`` on general text, token-averaged:

    - ``forgetting_loss``: KL(p_base || p_model) of the next-token distributions; 0 iff they agree;
    - ``cross_entropy_vs_base``: -sum_v p_base(v) log p_model(v), the cross-entropy against the base
      model's predicted distribution (= ``forgetting_loss`` + ``base_entropy``);
    - ``perplexity`` / ``base_perplexity``: exp of the mean next-token NLL of the text.

    ``base_model=None`` uses ``model`` with its adapters disabled, which is the base model only for
    a PEFT model whose base weights are the original ones (``PeftModel.from_pretrained`` on a
    milora adapter directory, or plain LoRA); a MiLoRA model from ``milora.load_model`` or
    ``milora.get_model`` holds residual base weights, so it needs ``base_model``.
    ``limit`` counts windows of ``max_length`` tokens."""
    from peft import PeftModel

    if base_model is None:
        residual = getattr(getattr(model, "milora_init", None), "init", "lora") != "lora"
        if residual or not isinstance(model, PeftModel):
            raise DataError(
                "The forgetting task needs the original base model: pass base_model= (CLI: --base-model, "
                "or --adapter, which loads the base twice)"
                + (", because this MiLoRA model's base weights are residuals." if residual else ".")
            )
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2 tokens (got {max_length}).")
    windows = list(_windows(tokenizer, documents, max_length, limit))
    if not windows:
        raise DataError("The forgetting text is empty.")
    totals = dict.fromkeys(("kl", "cross_entropy", "base_entropy", "nll", "base_nll", "tokens"), 0.0)
    items = []
    device = _device(model)
    with _padding_side(tokenizer, "right"), torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="forgetting", disable=not progress):
            batch = windows[start:start + batch_size]
            inputs = tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(device)
            logits = model(**inputs).logits
            with model.disable_adapter() if base_model is None else nullcontext():
                base_logits = (model if base_model is None else base_model)(**inputs).logits
            for row, ids in enumerate(batch):
                n = len(ids) - 1
                logp = logits[row, :n].float().log_softmax(-1)
                base_logp = base_logits[row, :n].to(logp.device).float().log_softmax(-1)
                base_p = base_logp.exp()
                targets = inputs["input_ids"][row, 1:n + 1].unsqueeze(-1)
                sums = {
                    "kl": (base_p * (base_logp - logp)).sum().item(),
                    "cross_entropy": -(base_p * logp).sum().item(),
                    "base_entropy": -(base_p * base_logp).sum().item(),
                    "nll": -logp.gather(-1, targets).sum().item(),
                    "base_nll": -base_logp.gather(-1, targets).sum().item(),
                }
                for key, value in sums.items():
                    totals[key] += value
                totals["tokens"] += n
                items.append({"index": len(items), "text": tokenizer.decode(ids), "tokens": n,
                              **{key: value / n for key, value in sums.items()}})
    tokens = totals["tokens"]
    scores = {
        "forgetting_loss": totals["kl"] / tokens,
        "cross_entropy_vs_base": totals["cross_entropy"] / tokens,
        "base_entropy": totals["base_entropy"] / tokens,
        "perplexity": math.exp(totals["nll"] / tokens),
        "base_perplexity": math.exp(totals["base_nll"] / tokens),
    }
    return scores, items


# ---------------------------------------------------------------- lm-eval


def _lm_eval_sample(sample: dict) -> dict:
    """Prompt, output and prediction of an lm-eval sample: for multiple choice the option
    log-likelihoods and the index of the best; for generation the text and the filtered answer."""
    arguments = sample.get("arguments") or [("",)]
    prompt = arguments[0][0] if isinstance(arguments[0], (list, tuple)) else arguments[0]
    filtered = sample.get("filtered_resps") or []
    if filtered and all(isinstance(r, (list, tuple)) and isinstance(r[0], float) for r in filtered):
        logliks = [r[0] for r in filtered]
        return {"prompt": prompt, "output": logliks, "prediction": logliks.index(max(logliks))}
    responses = sample.get("resps") or []
    text = responses[0][0] if responses and isinstance(responses[0], (list, tuple)) else responses
    return {"prompt": prompt, "output": text, "prediction": filtered[0] if len(filtered) == 1 else filtered}


def _lm_eval(model, tokenizer, tasks: list[str], include_path, *, limit, batch_size) -> tuple[dict, list[dict], dict]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise DataError("lm-eval tasks need the lm-evaluation-harness: `pip install lm-eval`.") from error
    if include_path is not None and not Path(include_path).exists():
        raise FileNotFoundError(f"lm-eval include path {include_path} does not exist.")
    manager = None
    if include_path is not None:  # local tasks alone index much faster than with the built-in catalogue
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DataError(f"Unknown lm-eval task(s) {', '.join(unknown)}: check the names with "
                        "`lm-eval ls tasks`, or pass the directory of your task YAMLs with --data.")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=True)
    except OSError as error:  # includes ConnectionError: the task's data is not reachable
        raise DataError(f"lm-eval could not read the data of {', '.join(tasks)} ({type(error).__name__}: {error}); "
                        "offline, define the task on local files and pass its YAML directory with --data.") from error
    scores, items = {}, []
    for task in tasks:
        metrics = output["results"].get(task, {})
        names = [k for k in metrics if "," in k and "_stderr" not in k and isinstance(metrics[k], (int, float))]
        if not names:
            continue
        primary = "acc,none" if "acc,none" in names else names[0]
        scores[task] = metrics[primary]
        metric = primary.split(",")[0]
        for sample in output.get("samples", {}).get(task, []):
            items.append({"dataset": task, **_lm_eval_sample(sample), "gold": sample.get("target"),
                          "correct": bool(sample.get(metric)), "doc_id": sample.get("doc_id")})
    return scores, items, output["results"]


# ---------------------------------------------------------------- entry point


def _model_label(model) -> str:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    return Path(str(path)).name or "model"


def evaluate(model, tokenizer, task: str, data: str | Path | None = None, *, limit: int | None = None,
             batch_size: int = 8, scorer: str = "generate", max_new_tokens: int | None = None,
             base_model=None, max_length: int = 1024, label: str | None = None,
             metadata: dict | None = None, progress: bool = True) -> dict:
    """Evaluate ``model`` on ``task``; returns ``{"summary": {...}, "items": [...]}``.

    ``summary["scores"]`` maps dataset (column) names to accuracies (fractions), or forgetting
    metric names to values; ``summary["average"]`` is the mean accuracy over datasets. Each
    benchmark item has ``prompt``, ``output``, ``prediction``, ``gold``, ``correct``."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1 (got {batch_size}).")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1 (got {limit}).")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be at least 1 (got {max_new_tokens}).")
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2 tokens (got {max_length}).")
    if scorer not in SCORERS:
        raise DataError(f"Unknown scorer {scorer!r}: choose one of {', '.join(SCORERS)}.")
    if scorer == "loglik" and task != "commonsense":
        raise DataError("--scorer loglik is for the commonsense task; other tasks generate.")
    started = time.time()
    was_training = model.training
    model.eval()
    settings: dict[str, Any] = {"batch_size": batch_size, "limit": limit}
    average = None
    try:
        if task.startswith("lm-eval:"):
            names = [t.strip() for t in task.split(":", 1)[1].split(",") if t.strip()]
            if not names:
                raise DataError("Name the lm-eval tasks after the colon, e.g. `lm-eval:boolq,piqa`.")
            scores, items, raw = _lm_eval(model, tokenizer, names, data, limit=limit, batch_size=batch_size)
            settings["lm_eval_results"] = raw
            source = str(data) if data is not None else "lm-eval"
            average = sum(scores.values()) / len(scores) if scores else None
        elif task == "forgetting":
            from milora.forgetting_text import load_documents

            documents, source = load_documents(data)
            settings["max_length"] = max_length
            scores, items = forgetting(model, tokenizer, documents, base_model=base_model, max_length=max_length,
                                       limit=limit, batch_size=batch_size, progress=progress)
        elif task in ACCURACY_TASKS:
            examples, source = load_examples(task, data, limit)
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
            settings.update(scorer=scorer if task == "commonsense" else "generate", max_new_tokens=max_new_tokens)
            if task != "commonsense":
                settings["stop_strings"] = list(MATH_STOP_STRINGS)
            if task == "gsm8k":
                settings["numeric_tolerance"] = f"|pred - gold| <= {grading.NUMERIC_RTOL} * max(1, |gold|)"
            items = _benchmark(model, tokenizer, task, examples, scorer=scorer, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress)
            scores = _accuracies(items)
            average = sum(scores.values()) / len(scores)
        else:
            raise DataError(f"Unknown task {task!r}: choose gsm8k, math, commonsense, forgetting or "
                            "lm-eval:<task,...>.")
    finally:
        model.train(was_training)
    summary = {"task": task, "label": label or _model_label(model), "data": source, "n": len(items),
               "scores": scores, "average": average, **(metadata or {}), "settings": settings,
               "elapsed_s": round(time.time() - started, 2)}
    return {"summary": summary, "items": items}


# ---------------------------------------------------------------- results


def write_results(result: dict, path: str | Path) -> Path:
    """Write a result as JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2, ensure_ascii=False, default=str)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def _is_accuracy(summary: dict) -> bool:
    return summary["task"] != "forgetting"


def _format_score(value: float | None, accuracy: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if accuracy else f"{value:.4f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned text table: first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """A one-run table: one row per dataset or metric, the average last (accuracies in %)."""
    summary = result["summary"]
    accuracy = _is_accuracy(summary)
    rows = [[PAPER_COLUMNS.get(name, name), _format_score(value, accuracy)]
            for name, value in summary["scores"].items()]
    if accuracy and summary["average"] is not None and len(summary["scores"]) > 1:
        rows.append(["Avg.", _format_score(summary["average"], True)])
    header = [f"{summary['label']} · {summary['task']} (n={summary['n']})", "accuracy %" if accuracy else "value"]
    return format_table(header, rows)


COMPARED_FORGETTING_METRICS = ("forgetting_loss", "perplexity")


def compare(result_files: list[str | Path]) -> str:
    """The paper's table layout for several result files: one row per method (``summary.label``),
    one column per dataset (plus forgetting loss and perplexity), the average accuracy last."""
    rows: dict[str, dict[str, float]] = {}
    accuracy_columns: dict[str, bool] = {}
    origin: dict[tuple[str, str], Path] = {}
    for file in map(Path, result_files):
        try:
            summary = json.loads(file.read_text(encoding="utf-8"))["summary"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataError(f"{file} is not a milora eval result ({error}).") from error
        for column, value in summary["scores"].items():
            if not _is_accuracy(summary) and column not in COMPARED_FORGETTING_METRICS:
                continue
            key = (summary["label"], column)
            if key in origin:
                raise DataError(f"{origin[key]} and {file} both hold {column} for {summary['label']!r}: "
                                "give the runs different names with --label.")
            origin[key] = file
            rows.setdefault(summary["label"], {})[column] = value
            accuracy_columns[column] = _is_accuracy(summary)
    paper_order = list(PAPER_COLUMNS)
    columns = sorted(accuracy_columns, key=lambda c: (not accuracy_columns[c],
                                                      paper_order.index(c) if c in paper_order else len(paper_order)))
    header = ["Method"] + [PAPER_COLUMNS.get(c, c) for c in columns] + ["Avg."]
    table = []
    for label, values in rows.items():
        accuracies = [values[c] for c in columns if accuracy_columns[c] and c in values]
        average = sum(accuracies) / len(accuracies) if accuracies else None
        table.append([label] + [_format_score(values.get(c), accuracy_columns[c]) for c in columns]
                     + [_format_score(average, True)])
    return format_table(header, table)
