"""IFEval (Zhou et al., 2023): prompts with verifiable instructions, scored by lm-evaluation-harness.

The 25 instruction checkers and the strict / loose scoring are lm-eval's ``ifeval`` task
(``lm_eval.tasks.ifeval``, a port of Google's reference code), called on milora's generations:

- strict: the response as generated; loose: the instruction also counts as followed when it holds
  for the response with its first and/or last line removed, or with ``*`` removed (8 variants);
- prompt level: a prompt counts when all its instructions are followed; instruction level: the
  fraction of all instructions followed (instructions of one prompt are not independent);
- an empty response follows nothing; random arguments some checkers draw are seeded (`score_response`).

Data: a local JSONL file of ``key``, ``prompt``, ``instruction_id_list``, ``kwargs`` records, or
the hub's ``google/IFEval`` when ``data`` is None. Prompts are rendered like `milora train`
renders them (`milora.prompts.instruction_prompts`: the chat template when the tokenizer has one).

Two instructions count with NLTK's ``punkt_tab`` tokenizer data: sentence counts
(``length_constraints:number_sentences``) and capital-word counts
(``change_case:capital_word_frequency``). milora does not download it. Without it the task
stops before generating, unless ``missing_punkt="skip"``, which leaves out the prompts that use
those instructions and reports how many (the scores are then those of the other prompts).
Install it with ``python -m nltk.downloader punkt_tab`` (online), or point ``NLTK_DATA`` at a
directory holding ``tokenizers/punkt_tab``.
"""

from __future__ import annotations

import io
import math
import random
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from milora.errors import DataError, DataNotFoundError
from milora.eval.generation import generate
from milora.eval.registry import Job, TaskResult, register
from milora.eval.scoring.predictions import load_predictions
from milora.io import read_records
from milora.prompts import instruction_prompts

HUB_DATASET = "google/IFEval"
NEEDS_PUNKT = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
"""The instructions whose lm-eval checkers call NLTK's punkt tokenizer (count_sentences, word_tokenize)."""
RANDOM_SEED = 0


@dataclass
class Prompt:
    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict]


# ---------------------------------------------------------------- data


def _prompt(record: dict, where: str) -> Prompt:
    try:
        prompt = Prompt(record["key"], record["prompt"], list(record["instruction_id_list"]), list(record["kwargs"]))
    except (KeyError, TypeError) as error:
        raise DataError(f"{where}: an IFEval record needs key, prompt, instruction_id_list and kwargs "
                        f"({error}).") from error
    if len(prompt.kwargs) != len(prompt.instruction_id_list):
        raise DataError(f"{where}: {len(prompt.instruction_id_list)} instructions but {len(prompt.kwargs)} kwargs.")
    return prompt


def load_prompts(data: str | Path | None) -> tuple[list[Prompt], str]:
    """The IFEval prompts of a local JSONL file, or of the hub's google/IFEval when ``data`` is None."""
    if data is None:
        import datasets

        try:
            records = list(datasets.load_dataset(HUB_DATASET, split="train"))
        except Exception as error:  # datasets raises many types (network, cache, auth)
            raise DataError(f"Could not load {HUB_DATASET} from the hub ({type(error).__name__}: {error}); offline, "
                            "pass a local copy of its JSONL file with --data.") from error
        source = f"hub:{HUB_DATASET}"
    else:
        if not Path(data).is_file():
            raise DataNotFoundError(f"IFEval data file {data} does not exist.")
        records, source = read_records(data), str(data)
    prompts = [_prompt(record, f"{source} record {i}") for i, record in enumerate(records)]
    if not prompts:
        raise DataError(f"{source} holds no IFEval prompts.")
    return prompts, source


# ---------------------------------------------------------------- lm-eval's checkers


def punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


@contextmanager
def _no_nltk_download():
    """lm-eval's ifeval module calls ``nltk.download("punkt_tab")`` on import when the data is missing
    and then prints "Downloaded punkt_tab" whatever happened; milora leaves downloads to the user."""
    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        nltk.download = download


def _scorer():
    """lm-eval's ifeval ``utils`` module (strict and loose checks), with langdetect made deterministic."""
    try:
        with _no_nltk_download():
            from lm_eval.tasks.ifeval import utils
        import langdetect
    except ImportError as error:
        raise DataError(f"IFEval needs lm-eval's ifeval dependencies ({error}): "
                        "`pip install 'milora[ifeval]'` (lm-eval, langdetect, immutabledict, nltk).") from error
    langdetect.DetectorFactory.seed = 0  # language checks are otherwise random on short texts
    return utils


def _select(prompts: list[Prompt], missing_punkt: str) -> tuple[list[Prompt], list[Prompt]]:
    """``(scored, skipped)``: all prompts when punkt is installed; else an error, or those without punkt
    instructions."""
    if punkt_available():
        return prompts, []
    needing = [p for p in prompts if set(p.instruction_id_list) & set(NEEDS_PUNKT)]
    left_out = {p.key for p in needing}
    if needing and missing_punkt == "error":
        raise DataError(
            f"{len(needing)} of the {len(prompts)} IFEval prompts use instructions checked with NLTK's punkt_tab "
            f"data ({', '.join(NEEDS_PUNKT)}), which is not installed. Install it (`python -m nltk.downloader "
            "punkt_tab`, or set NLTK_DATA to a directory holding tokenizers/punkt_tab), or score the other prompts "
            "with missing_punkt='skip' (CLI: --missing-punkt skip), which reports how many were left out."
        )
    return [p for p in prompts if p.key not in left_out], needing


def score_response(prompt: Prompt, response: str, utils=None) -> dict:
    """lm-eval's verdicts on one response: ``{"strict": [bool per instruction], "loose": [...]}``.

    Some checkers draw random arguments when the data's are unusable (``keywords:letter_frequency``
    with a letter outside a-z, e.g. "#"): Python's ``random`` is seeded with the same value for the
    strict and the loose check, so both use one draw and runs repeat (its state is restored after).
    """
    utils = utils or _scorer()
    example = utils.InputExample(key=prompt.key, instruction_id_list=prompt.instruction_id_list,
                                 prompt=prompt.prompt, kwargs=prompt.kwargs)
    state = random.getstate()
    verdicts = {}
    try:
        for mode, check in (("strict", utils.test_instruction_following_strict),
                            ("loose", utils.test_instruction_following_loose)):
            random.seed(RANDOM_SEED)
            verdicts[mode] = list(check(example, response).follow_instruction_list)
    except LookupError as error:  # NLTK data: `_select` checks for it first, this is a safety net
        raise DataError(f"IFEval prompt {prompt.key}: an instruction checker needs NLTK data ({error}).") from error
    finally:
        random.setstate(state)
    return verdicts


def summarise(items: list[dict]) -> tuple[dict[str, float], dict]:
    """Prompt- and instruction-level accuracy, strict and loose, and their binomial standard errors."""
    scores, errors = {}, {}
    instructions = sum(len(item["prediction"]["strict"]) for item in items)
    for mode in ("strict", "loose"):
        prompt_level = sum(all(item["prediction"][mode]) for item in items) / len(items)
        inst_level = sum(sum(item["prediction"][mode]) for item in items) / instructions
        scores[f"ifeval_prompt_{mode}"], scores[f"ifeval_inst_{mode}"] = prompt_level, inst_level
        errors[f"ifeval_prompt_{mode}"] = math.sqrt(prompt_level * (1 - prompt_level) / len(items))
        errors[f"ifeval_inst_{mode}"] = math.sqrt(inst_level * (1 - inst_level) / instructions)
    return scores, {"n_prompts": len(items), "n_instructions": instructions, "standard_errors": errors,
                    "standard_error_kind": "binomial sqrt(p(1-p)/n); instruction level treats instructions as "
                                           "independent, which understates it"}


# ---------------------------------------------------------------- the task


def _responses(job: Job, every: list[Prompt], scored: list[Prompt]) -> tuple[list[str], list[str], dict]:
    """``(rendered prompts, responses, settings)`` of the scored prompts (some of the first ``limit`` of
    ``every`` prompt of the data): generated, or read from the predictions file."""
    options = job.options
    if options["predictions"] is not None:
        position = {p.key: i for i, p in enumerate(every)}
        outputs = load_predictions(options["predictions"], [[str(p.key)] for p in every],
                                   [position[p.key] for p in scored])  # prompts left out need no answer
        return [p.prompt for p in scored], outputs, {"predictions": str(options["predictions"])}
    rendered, template = instruction_prompts(job.tokenizer, [p.prompt for p in scored], options["template"])
    max_new_tokens = options["max_new_tokens"]
    outputs = generate(job.model, job.tokenizer, rendered, max_new_tokens=max_new_tokens, batch_size=job.batch_size,
                       add_special_tokens=template != "chat", progress=job.progress, desc="ifeval")
    return rendered, outputs, {"template": template, "max_new_tokens": max_new_tokens, "decoding": "greedy"}


@register("ifeval", "IFEval verifiable instructions: prompt/instruction-level accuracy, strict and loose (lm-eval)",
          metric="rate", table_scores=("ifeval_prompt_strict", "ifeval_prompt_loose"), server=True,
          check_data=lambda data, options: None if data is None else load_prompts(data))
def _run(job: Job) -> TaskResult:
    every, source = load_prompts(job.data)
    scored, skipped = _select(every[:job.limit], job.options["missing_punkt"])
    if not scored:
        raise DataError("Every selected IFEval prompt needs NLTK's punkt_tab data: install it (see --missing-punkt).")
    utils = _scorer()
    rendered, responses, settings = _responses(job, every, scored)
    items = []
    for prompt, text, response in zip(scored, rendered, responses, strict=True):
        verdicts = score_response(prompt, response, utils)
        items.append({"key": prompt.key, "prompt": text, "output": response, "prediction": verdicts,
                      "gold": prompt.instruction_id_list, "correct": all(verdicts["strict"]),
                      "correct_loose": all(verdicts["loose"])})
    scores, statistics = summarise(items)
    settings.update(statistics, skipped_prompts=len(skipped), skipped_keys=[p.key for p in skipped],
                    punkt_tab="installed" if punkt_available() else "missing (prompts needing it are left out)")
    return TaskResult(scores, items, source, settings)
