"""AlpacaEval (Li et al., 2023): the model's answers judged pairwise against reference answers.

The 805 AlpacaEval instructions come with the reference answers: the hub's
``tatsu-lab/alpaca_eval`` (its ``alpaca_eval.json``: text-davinci-003 answers, the AlpacaEval 1.0
protocol of the paper) when ``reference`` is None, or a local JSON / JSONL file of
``instruction`` + ``output`` records (``generator`` optional), e.g. the GPT-4-turbo answers of
AlpacaEval 2.0. The model answers each instruction (prompt rendered like `milora train` does:
its chat template when it has one; greedy), then the judge (`milora.eval.scoring.judge`, the user's
choice) compares each answer with the reference, in a seeded random order.

Scores are the package's (`alpaca_eval.metrics`): ``win_rate`` = mean preference for the model
(a tie counts 1/2) and its ``standard_error`` (standard error of the mean over the judged
items), ``discrete_win_rate``, the length-controlled win rate (``lc_win_rate``) when the
package can compute it (it fetches instruction difficulties from the hub), ``avg_length`` of
the answers in characters, and counts; win rates are fractions here (the package reports %).
The length-controlled model uses each item's position as its AlpacaEval index: it means something
only for the 805 AlpacaEval instructions in their published order (any reference answers), and
its cross-validated fit is unstable on a few items.
Verdicts the package cannot parse are counted (``n_unparsed``) and left out of the win rate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from milora.errors import DataError, DataNotFoundError
from milora.eval.generation import generate
from milora.eval.registry import Job, TaskResult, register
from milora.eval.scoring.judge import build_annotator, check_judge, preference, raw_completion, record_completions
from milora.eval.scoring.predictions import load_predictions
from milora.io import read_records
from milora.prompts import instruction_prompts

HUB_DATASET = ("tatsu-lab/alpaca_eval", "alpaca_eval.json")  # AlpacaEval 1.0: 805 text-davinci-003 answers


def load_reference(reference: str | Path | None) -> tuple[list[dict], str]:
    """``[{"instruction", "output", "generator"}]`` in data order, and where they came from."""
    if reference is None:  # the hub repository's data file (its loading script is not run: datasets 4 dropped scripts)
        from huggingface_hub import hf_hub_download

        try:
            records = read_records(hf_hub_download(HUB_DATASET[0], HUB_DATASET[1], repo_type="dataset"))
        except Exception as error:  # network, authentication, a moved file
            raise DataError(f"Could not fetch {HUB_DATASET[1]} of {HUB_DATASET[0]} from the hub "
                            f"({type(error).__name__}: {error}); pass local reference answers with reference= "
                            "(CLI: --reference FILE).") from error
        source = "hub:" + "/".join(HUB_DATASET)
    else:
        if not Path(reference).is_file():
            raise DataNotFoundError(f"Reference file {reference} does not exist.")
        records, source = read_records(reference), str(reference)
    rows = []
    for index, record in enumerate(records):
        if not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), str):
            raise DataError(f"{source} record {index}: needs string `instruction` and `output` (the reference answer).")
        rows.append({"instruction": record["instruction"], "output": record["output"],
                     "generator": str(record.get("generator") or "reference")})
    if not rows:
        raise DataError(f"{source} holds no reference answers.")
    return rows, source


def _answers(job: Job, rows: list[dict], every: list[dict]) -> tuple[list[str], list[str], dict]:
    """``(prompts, answers, settings)`` of ``rows`` (the first of ``every`` row of the data): generated, or
    read from the predictions file (whose ids may name any of ``every``)."""
    options = job.options
    if options["predictions"] is not None:
        outputs = load_predictions(options["predictions"], [[str(i), r["instruction"]] for i, r in enumerate(every)],
                                   range(len(rows)))
        return [r["instruction"] for r in rows], outputs, {"predictions": str(options["predictions"])}
    prompts, template = instruction_prompts(job.tokenizer, [r["instruction"] for r in rows], options["template"])
    max_new_tokens = options["max_new_tokens"]
    outputs = generate(job.model, job.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=job.batch_size,
                       add_special_tokens=template != "chat", progress=job.progress, desc="alpaca-eval")
    return prompts, [o.strip() for o in outputs], {"template": template, "max_new_tokens": max_new_tokens,
                                                    "decoding": "greedy"}


def win_rates(annotations: list[dict]) -> tuple[dict[str, float], dict]:
    """The package's win rates of the judged pairs (unparsed verdicts left out and counted), and notes on
    what could not be computed."""
    import pandas as pd
    from alpaca_eval.metrics import get_length_controlled_winrate, get_winrate

    frame = pd.DataFrame(annotations)
    parsed = frame[frame["preference"].map(lambda v: preference({"preference": v}) is not None)]
    scores, notes = {"n_unparsed": int(len(frame) - len(parsed))}, {}
    if parsed.empty:  # the answers and raw verdicts are still worth keeping: no scores, and why
        notes["win_rate"] = (f"not computed: none of the judge's {len(frame)} verdicts could be parsed (see the items' "
                             "judge_raw); use a stronger judge or another annotator config")
        return {**scores, "n_total": 0}, notes
    metrics = get_winrate(parsed)
    scores.update(win_rate=metrics["win_rate"] / 100, standard_error=metrics["standard_error"] / 100,
                  discrete_win_rate=metrics["discrete_win_rate"] / 100,
                  **{key: int(metrics[key]) for key in ("n_wins", "n_wins_base", "n_draws", "n_total")})
    try:  # needs the package's instruction difficulties, from the hub
        lc = get_length_controlled_winrate(parsed.copy(), save_weights_dir=None, is_warn_extreme_changes=False)
        scores.update(lc_win_rate=lc["length_controlled_winrate"] / 100,
                      lc_standard_error=lc["lc_standard_error"] / 100)
    except Exception as error:  # offline (hub), or too few items for its cross-validated GLM
        notes["lc_win_rate"] = f"not computed ({type(error).__name__}: {str(error)[:200]})"
    return scores, notes


def _items(rows, prompts, answers, annotations) -> list[dict]:
    items = []
    for index, (row, prompt, answer, note) in enumerate(zip(rows, prompts, answers, annotations, strict=False)):
        verdict = preference(note)
        winner = None if verdict is None else "model" if verdict > 1.5 else "reference" if verdict < 1.5 else "tie"
        items.append({"index": index, "instruction": row["instruction"], "prompt": prompt, "output": answer,
                      "gold": row["output"], "prediction": winner, "verdict": verdict,
                      "judge_raw": note.get("preference_raw_completion"), "correct": winner == "model"})
    return items


def _judge(annotator, rows: list[dict], answers: list[str]) -> list[dict]:
    """The package's head-to-head annotation: output_1 the reference, output_2 the model; in data order."""
    model = "model" if rows[0]["generator"] != "model" else "evaluated-model"  # the LC win rate needs two names
    log = record_completions(annotator)
    annotations = annotator.annotate_head2head(
        outputs_1=[{**row, "index": i} for i, row in enumerate(rows)],
        outputs_2=[{"instruction": r["instruction"], "output": a, "generator": model, "index": i}
                   for i, (r, a) in enumerate(zip(rows, answers, strict=True))],
        is_ordered=True)
    annotations = sorted(annotations, key=lambda note: note["index"])
    for note, row, answer in zip(annotations, rows, answers, strict=False):
        if not isinstance(note.get("preference_raw_completion"), str):  # NaN: the package dropped an unparsed one
            note["preference_raw_completion"] = raw_completion(log, row["instruction"], row["output"], answer)
    return annotations


@register("alpaca-eval", "AlpacaEval: answers judged pairwise against reference answers (alpaca-eval), win rates",
          metric="rate", table_scores=("win_rate", "lc_win_rate"), server=True,
          check_data=lambda data, options: options["reference"] and load_reference(options["reference"]))
def _run(job: Job) -> TaskResult:
    options = job.options
    if job.data is not None:
        raise DataError("alpaca-eval reads its instructions with the reference answers: pass them as reference= "
                        "(CLI: --reference FILE) instead of data.")
    if options["judge"] is None:
        raise DataError("alpaca-eval needs a judge (CLI: --judge): an alpaca-eval annotator config such as "
                        "alpaca_eval_gpt4 (AlpacaEval 1.0; needs OPENAI_API_KEY), a local model directory, or the "
                        "URL of an OpenAI-compatible server.")
    every, source = load_reference(options["reference"])
    rows = every[:job.limit]
    if options["predictions"] is not None:  # a bad file is an error before the judge is even set up
        prompts, answers, settings = _answers(job, rows, every)
    with tempfile.TemporaryDirectory(prefix="milora-judge-") as workdir:
        annotator, judge = build_annotator(options["judge"], Path(workdir), judge_model=options["judge_model"],
                                           batch_size=job.batch_size)
        judge.update(check_judge(annotator, options["judge"]))  # before generating 805 answers
        if options["predictions"] is None:
            prompts, answers, settings = _answers(job, rows, every)
        annotations = _judge(annotator, rows, answers)
    scores, notes = win_rates(annotations)
    scores["avg_length"] = sum(map(len, answers)) / len(answers)
    settings.update(judge=judge, notes=notes, n=len(rows), reference_generator=rows[0]["generator"],
                    standard_error_kind="standard error of the mean preference over the judged items")
    return TaskResult(scores, _items(rows, prompts, answers, annotations), source, settings)
