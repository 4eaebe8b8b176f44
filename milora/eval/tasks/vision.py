"""Visual question answering tasks for image-text-to-text models, on local JSON files and image folders.

- ``vqa``: open answers (VQAv2, GQA, VizWiz, TextVQA style). A record has ``image`` (a path
  relative to ``image_folder``, default the data file's folder), ``question`` and either
  ``answer`` (one string: normalised exact match) or ``answers`` (ten annotator answers, strings
  or ``{"answer": ...}``: VQAv2's soft accuracy; another number of answers: exact match with any).
  Scores per data file: the mean item score; the exact-match rate is in ``settings``.
- ``pope``: yes/no object-hallucination questions (``answer`` yes or no, optional ``category``
  such as random / popular / adversarial): accuracy, precision, recall, F1 ("yes" positive) and
  yes-ratio over all items, and F1 per category.
- ``mcq-image``: letter choice (ScienceQA-IMG, MMBench): ``question``, options as ``options`` /
  ``choices`` (a list) or MMBench's ``A``..``E`` fields, ``answer`` a letter or an option index,
  optional ``hint`` / ``context`` put before the question; ``image`` optional (text-only items).

Protocol (LLaVA-1.5's evaluation prompts): the question as a user turn after the image
placeholder, followed by "Answer the question using a single word or phrase." (vqa, pope) or the
lettered options and "Answer with the option's letter from the given choices directly."
(mcq-image), rendered with the processor's chat template; greedy decoding; scoring in
`milora.eval.scoring.vqa_grading`. Every image is checked before the model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milora.errors import DataError, DataNotFoundError
from milora.eval.generation import generate_with_images
from milora.eval.registry import Job, TaskResult, register
from milora.eval.scoring import vqa_grading
from milora.eval.scoring.predictions import first_per_dataset, item_ids, load_predictions
from milora.eval.tasks.benchmarks import dataset_name
from milora.images import check_image, split_placeholders
from milora.io import read_records
from milora.prompts import MCQ_LETTER_ANSWER, VQA_SHORT_ANSWER, apply_chat_template, image_question

_LETTERS = "ABCDEFGHIJ"


@dataclass
class VisualItem:
    """One question: its data file, image paths, user turn (LLaVA style), gold answer(s), options."""

    dataset: str
    images: list[Path]
    turn: str
    gold: Any
    options: list[str] = field(default_factory=list)
    category: str | None = None
    id: str = ""  # ``<dataset>/<index>`` (the --predictions id)


def _sources(data: str | Path | None) -> list[Path]:
    if data is None:
        raise DataError("visual question answering tasks need --data: a .json/.jsonl file or a folder of them.")
    path = Path(data)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataNotFoundError(f"Data path {path} does not exist.")
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
    if not files:
        raise DataError(f"{path} holds no .json or .jsonl files of questions.")
    return files


def _text(record: dict, names: tuple[str, ...], where: str) -> str:
    value = next((record[n] for n in names if isinstance(record.get(n), str) and record[n].strip()), None)
    if value is None:
        raise DataError(f"{where}: no {' / '.join(repr(n) for n in names)} text (keys: {sorted(record)}).")
    return value


def _answers(record: dict, where: str) -> list[str]:
    if "answers" in record:
        answers = [a.get("answer") if isinstance(a, dict) else a for a in record["answers"] or []]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'answers' must be a non-empty list of strings or {{'answer': ...}} objects.")
        return answers
    return [_text(record, ("answer",), where)]


def _options(record: dict, where: str) -> list[str]:
    options = record.get("options", record.get("choices"))
    if options is None:
        options = [record[key] for key in _LETTERS if isinstance(record.get(key), str) and record[key].strip()]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise DataError(f"{where}: needs at least two options ('options' / 'choices' list, or fields A, B, ...).")
    return options


def _gold_letter(record: dict, options: list[str], where: str) -> str:
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return _LETTERS[answer]
    if isinstance(answer, str) and answer.strip().upper() in _LETTERS[:len(options)]:
        return answer.strip().upper()
    raise DataError(f"{where}: 'answer' must be an option letter or index (of {len(options)} options), got {answer!r}.")


def _item(task: str, record: dict, name: str, folder: Path, where: str) -> VisualItem:
    question = _text(record, ("question", "text"), where)
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image):
        raise DataError(f"{where}: 'image' must be a path, got {image!r}.")
    if image is None and task != "mcq-image":
        raise DataError(f"{where}: no 'image' path.")
    images = [folder / image] if image else []
    if task == "mcq-image":
        options = _options(record, where)
        hint = next((record[k] for k in ("hint", "context") if isinstance(record.get(k), str) and record[k].strip()),
                    "")
        lettered = "\n".join(f"{letter}. {option}" for letter, option in zip(_LETTERS, options, strict=False))
        text = (f"Context: {hint}\n" if hint else "") + f"{question}\n{lettered}"
        return VisualItem(name, images, image_question(text, MCQ_LETTER_ANSWER, len(images)),
                          _gold_letter(record, options, where), options)
    gold = _answers(record, where)
    if task == "pope":
        if gold[0].strip().lower() not in ("yes", "no"):
            raise DataError(f"{where}: a POPE answer is yes or no, got {gold[0]!r}.")
        gold = gold[0].strip().lower()
    return VisualItem(name, images, image_question(question, VQA_SHORT_ANSWER), gold,
                      category=record.get("category") if task == "pope" else None)


def load_items(task: str, data, image_folder: str | None, limit: int | None,
               check_images: bool = True) -> list[VisualItem]:
    """The questions of every data file (``limit`` per file), every image checked to be readable first
    (unless ``check_images`` is False: answers made elsewhere need no image)."""
    items = []
    for path in _sources(data):
        folder = Path(image_folder) if image_folder is not None else path.parent
        records = read_records(path)
        items += [_item(task, record, dataset_name(path), folder, f"{path} item {index}")
                  for index, record in enumerate(records[:limit])]
    if not items:
        raise DataError(f"{data} holds no questions.")
    checked = set() if check_images else {image for item in items for image in item.images}
    for index, item in enumerate(items):
        for image in item.images:
            if image not in checked:
                check_image(image, index)
                checked.add(image)
    return items


def _score(task: str, item: VisualItem, output: str) -> dict[str, Any]:
    if task == "pope":
        prediction = vqa_grading.pope_answer(output)
        return {"prediction": prediction, "correct": prediction == item.gold}
    if task == "mcq-image":
        prediction = vqa_grading.extract_choice_letter(output, item.options)
        return {"prediction": prediction, "correct": prediction == item.gold}
    prediction = vqa_grading.first_line_answer(output)
    matched = vqa_grading.exact_match(prediction, item.gold)
    score = vqa_grading.vqa_accuracy(prediction, item.gold) if len(item.gold) == 10 else float(matched)
    return {"prediction": prediction, "correct": matched, "score": score}


def _means(items: list[dict], key: str) -> dict[str, float]:
    names = list(dict.fromkeys(item["dataset"] for item in items))
    return {name: sum(float(i[key]) for i in items if i["dataset"] == name) / sum(i["dataset"] == name for i in items)
            for name in names}


def _outputs(job: Job) -> tuple[list[VisualItem], list[str], list[str], dict]:
    """``(items, prompts, outputs, settings)``: generated by the model, or read from the predictions file
    (whose ids may name any item of the data; the prompts are then the user turns, unrendered)."""
    predictions = job.options["predictions"]
    if predictions is not None:
        every = load_items(job.task, job.data, job.options["image_folder"], None, check_images=False)
        ids = item_ids([item.dataset for item in every])
        chosen = first_per_dataset([item.dataset for item in every], job.limit)
        outputs = load_predictions(predictions, [[name] for name in ids], chosen)
        items = [every[i] for i in chosen]
        for item, i in zip(items, chosen, strict=True):
            item.id = ids[i]
        return items, [item.turn for item in items], outputs, {"predictions": str(predictions)}
    processor = job.tokenizer
    if not hasattr(processor, "image_processor"):
        raise DataError(f"task {job.task} needs an image-text-to-text model (LLaVA, Qwen2-VL, ...) and its processor; "
                        f"{type(job.model).__name__} is a text-only model.")
    items = load_items(job.task, job.data, job.options["image_folder"], job.limit)
    for item, name in zip(items, item_ids([item.dataset for item in items]), strict=True):
        item.id = name
    prompts = [apply_chat_template(processor, [{"role": "user", "content": split_placeholders(item.turn)}], True)
               for item in items]
    max_new_tokens = job.options["max_new_tokens"]
    outputs = generate_with_images(job.model, processor, prompts, [item.images for item in items],
                                   max_new_tokens=max_new_tokens, batch_size=job.batch_size, progress=job.progress,
                                   desc=job.task)
    return items, prompts, outputs, {"max_new_tokens": max_new_tokens, "decoding": "greedy"}


def _run(job: Job) -> TaskResult:
    items, prompts, outputs, settings = _outputs(job)
    records = [{"id": item.id, "dataset": item.dataset, "image": [str(p) for p in item.images], "prompt": prompt,
                "output": output, "gold": item.gold, **_score(job.task, item, output)}
               for item, prompt, output in zip(items, prompts, outputs, strict=True)]
    if job.task == "pope":
        scores = vqa_grading.pope_metrics([r["prediction"] for r in records], [r["gold"] for r in records])
        for category in sorted({item.category for item in items if item.category}):
            chosen = [r for r, item in zip(records, items, strict=True) if item.category == category]
            scores[f"f1_{category}"] = vqa_grading.pope_metrics([r["prediction"] for r in chosen],
                                                                [r["gold"] for r in chosen])["f1"]
        return TaskResult(scores, records, str(job.data), settings)
    if job.task == "vqa":
        settings["exact_match"] = _means(records, "correct")
        settings["soft_accuracy_items"] = sum(len(item.gold) == 10 for item in items)
        return TaskResult(_means(records, "score"), records, str(job.data), settings)
    return TaskResult(_means(records, "correct"), records, str(job.data), settings)


def _checker(task: str):
    """`Task.check_data`: every record of the data parsed (the images are checked when the task runs)."""
    def check(data, options: dict) -> None:
        load_items(task, data, options["image_folder"], None, check_images=False)
    return check


register("vqa", "open visual questions: normalised exact match, VQAv2 soft accuracy for 10 answers",
         check_data=_checker("vqa"))(_run)
register("pope", "POPE yes/no object hallucination: accuracy, precision, recall, F1, yes-ratio", metric="value",
         table_scores=("f1", "accuracy"), check_data=_checker("pope"))(_run)
register("mcq-image", "multiple choice with images (ScienceQA-IMG, MMBench): option letter accuracy",
         check_data=_checker("mcq-image"))(_run)
