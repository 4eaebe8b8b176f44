"""The paper's benchmarks: math word problems (GSM8K), MATH, and the commonsense suite.

- ``gsm8k``: math word problems, GSM8K JSONL (``question``/``answer`` with ``#### N``) or the
  LLM-Adapters math format (``instruction``/``input``/``output``/``answer``, a number or, for
  AQuA items, a letter A-E); the hub's ``openai/gsm8k`` test split when ``data`` is None.
- ``math``: Hendrycks MATH (``problem``/``solution``, gold = last ``\\boxed{}``, or an ``answer``
  field); JSON, JSONL or a directory of them; ``EleutherAI/hendrycks_math`` when ``data`` is None.
- ``commonsense``: LLM-Adapters commonsense files (a file, or a directory of ``<task>/test.json``);
  scorer ``generate`` (the paper's protocol) or ``loglik`` (log-likelihood of each label option).

Protocol of the paper (LLM-Adapters for commonsense, MetaMath/PiSSA for math): Alpaca prompt
(`milora.prompts.eval_prompt`), for math ending in "### Response: Let's think step by step.",
greedy decoding, the MetaMath stop strings for math, 32 new tokens for commonsense.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora.errors import DataError, DataNotFoundError, shown
from milora.eval.generation import continuation_logprobs, generate
from milora.eval.registry import Job, TaskResult, register
from milora.eval.scoring import grading
from milora.eval.scoring.predictions import first_per_dataset, item_ids, load_predictions
from milora.io import read_records
from milora.prompts import COMMONSENSE_ANSWER_PREFIX, MATH_STOP_STRINGS, eval_prompt

ACCURACY_TASKS = ("gsm8k", "math", "commonsense")
_HUB_DEFAULTS = {
    "gsm8k": [("openai/gsm8k", "main")],
    "math": [("EleutherAI/hendrycks_math", subject) for subject in (
        "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
        "number_theory", "prealgebra", "precalculus")],
}
_SPLIT_SUFFIXES = ("_test", "-test", "_train", "-train", "_validation", "_dev")


@dataclass
class Example:
    """One benchmark item: where it comes from, its prompt fields, its gold answer."""

    dataset: str
    instruction: str
    input: str
    gold: Any
    options: tuple[str, ...] = ()
    id: str = ""  # ``<dataset>/<index>`` (the --predictions id), set by `load_examples`

# ---------------------------------------------------------------- data


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
        raise DataNotFoundError(f"Data path {path} does not exist.")
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

    sources = _HUB_DEFAULTS[task] if data is None else [tuple([*data.split(":", 1), None][:2])]
    records = []
    for repo, config in sources:
        try:
            records.extend(datasets.load_dataset(repo, config, split="test"))
        except Exception as error:  # datasets raises many types (network, missing split, bad config)
            raise DataError(
                f"{repo!r} is not a local path and could not be loaded from the hub "
                f"({type(error).__name__}: {error}); offline, pass a local file or directory with --data."
            ) from error
    return (task if data is None else data.split("/")[-1].split(":")[0]), records


def _field(record: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        if isinstance(record.get(name), str):
            return record[name]
    given = [name for name in names if name in record]
    if given:
        raise DataError(f"{where}: `{given[0]}` must be a string, got {shown(record[given[0]])}.")
    raise DataError(f"{where}: no {' / '.join(f'`{n}`' for n in names)} field (keys: {shown(sorted(record))}).")


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
    """The examples of a benchmark task (``limit`` per dataset) and a description of the source; each
    example's ``id`` is ``<dataset>/<index>``."""
    if task not in ACCURACY_TASKS:
        raise DataError(f"Unknown benchmark task {task!r}: choose one of {', '.join(ACCURACY_TASKS)}.")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1 (got {limit}).")
    if data is None and task not in _HUB_DEFAULTS:
        raise DataError("The commonsense task needs data (CLI: --data): an LLM-Adapters file or a directory of "
                        "<task>/test.json.")
    hub_name = data is not None and not Path(data).exists() and Path(data).suffix not in {".json", ".jsonl"}
    if data is None or (hub_name and task in _HUB_DEFAULTS):
        name, records = _hub_records(task, None if data is None else str(data))
        return _with_ids(_examples(task, name, records[:limit], f"hub:{data or name}")), f"hub:{data or name}"
    examples = []
    for name, files in _data_sources(task, data):
        taken: list[Example] = []
        for file in files:
            if limit is not None and len(taken) >= limit:
                break
            records = read_records(file, single_object=True)
            taken += _examples(task, name, records if limit is None else records[:limit - len(taken)], str(file))
        examples += taken
    if not examples:
        raise DataError(f"{data} holds no examples.")
    return _with_ids(examples), str(data)


def _with_ids(examples: list[Example]) -> list[Example]:
    for example, name in zip(examples, item_ids([e.dataset for e in examples]), strict=True):
        example.id = name
    return examples


def build_prompt(example: Example, task: str) -> str:
    """The paper's evaluation prompt of a benchmark item (see `milora.prompts.eval_prompt`)."""
    return eval_prompt(task, example.instruction, example.input)


# ---------------------------------------------------------------- scoring


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
                    for prompt, example in zip(prompts, examples, strict=True) for option in example.options]
        scores = iter(continuation_logprobs(model, tokenizer, requests, batch_size=batch_size, progress=progress))
        for prompt, example in zip(prompts, examples, strict=True):
            loglik = {option: next(scores) for option in example.options}
            prediction = max(loglik, key=loglik.get)
            items.append({"id": example.id, "dataset": example.dataset, "prompt": prompt,
                          "output": f"{COMMONSENSE_ANSWER_PREFIX} {prediction}", "prediction": prediction,
                          "gold": example.gold, "correct": prediction == example.gold, "loglik": loglik})
        return items
    stops = MATH_STOP_STRINGS if task in ("gsm8k", "math") else ()
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       stop_strings=stops, progress=progress, desc=task)
    return _graded(task, examples, prompts, outputs)


def _graded(task: str, examples: list[Example], prompts: list[str], outputs: list[str]) -> list[dict]:
    items = []
    for prompt, example, output in zip(prompts, examples, outputs, strict=True):
        prediction, correct = _grade(task, example, output)
        items.append({"id": example.id, "dataset": example.dataset, "prompt": prompt, "output": output,
                      "prediction": prediction, "gold": example.gold, "correct": correct})
    return items


def _accuracies(items: list[dict]) -> dict[str, float]:
    names = list(dict.fromkeys(item["dataset"] for item in items))
    return {name: sum(i["correct"] for i in items if i["dataset"] == name) / sum(i["dataset"] == name for i in items)
            for name in names}


# ---------------------------------------------------------------- tasks


def _from_predictions(job: Job) -> TaskResult:
    """The answers of the predictions file, graded; its ids may name any item of the data."""
    task, options = job.task, job.options
    if options.get("scorer") == "loglik":
        raise DataError("--scorer loglik scores the model's log-likelihoods, not answers: drop it with --predictions.")
    every, source = load_examples(task, job.data)
    chosen = first_per_dataset([e.dataset for e in every], job.limit)
    outputs = load_predictions(options["predictions"], [[e.id] for e in every], chosen)
    examples = [every[i] for i in chosen]
    items = _graded(task, examples, [build_prompt(e, task) for e in examples], outputs)
    return TaskResult(_accuracies(items), items, source, {"predictions": str(options["predictions"])})


def _run(job: Job) -> TaskResult:
    task, options = job.task, job.options
    if options["predictions"] is not None:
        return _from_predictions(job)
    examples, source = load_examples(task, job.data, job.limit)
    max_new_tokens = options["max_new_tokens"]
    scorer = options.get("scorer", "generate")
    settings: dict[str, Any] = {"scorer": scorer, "max_new_tokens": max_new_tokens}
    if task != "commonsense":
        settings["stop_strings"] = list(MATH_STOP_STRINGS)
    if task == "gsm8k":
        settings["numeric_tolerance"] = f"|pred - gold| <= {grading.NUMERIC_RTOL} * max(1, |gold|)"
    items = _benchmark(job.model, job.tokenizer, task, examples, scorer=scorer, batch_size=job.batch_size,
                       max_new_tokens=max_new_tokens, progress=job.progress)
    return TaskResult(_accuracies(items), items, source, settings)


def _checker(task: str):
    """`Task.check_data` of a benchmark: every item of local data parsed (question, gold answer)."""
    def check(data, options: dict) -> None:
        if data is not None and Path(data).exists():
            load_examples(task, data)
    return check


register("gsm8k", "GSM8K / math word problems, generated chain of thought, numeric answer", server=True,
         check_data=_checker("gsm8k"))(_run)
register("math", "Hendrycks MATH, generated chain of thought, boxed answer", server=True,
         check_data=_checker("math"))(_run)
register("commonsense", "LLM-Adapters commonsense suite, generated label (or --scorer loglik)", server=True,
         check_data=_checker("commonsense"))(_run)
