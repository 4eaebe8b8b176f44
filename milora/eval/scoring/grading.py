"""Answer extraction and grading for the paper's benchmarks: pure functions, no model.

- Math word problems (GSM8K, the LLM-Adapters math sets): the prediction is the number after
  the last "The answer is" (falling back to the last number in the response); a prediction is
  correct when ``|pred - gold| <= NUMERIC_RTOL * max(1, |gold|)``. Multiple-choice items (AQuA,
  gold A-E) take the letter right after the last "The answer is".
- MATH (Hendrycks): the gold answer is the content of the last ``\\boxed{}``, the prediction the
  last ``\\boxed{}`` of the response (else what follows "The answer is"); the two are compared
  by Hugging Face's ``math-verify`` (LaTeX and plain expressions parsed to sympy: numbers to 6
  decimals, fractions, roots, units, percentages, intervals, sets, tuples, equations). An
  answer it cannot parse into an expression is wrong (math-verify alone would compare the
  raw strings).
- Commonsense (LLM-Adapters format): the prediction is the first match of the task's label
  pattern in the lower-cased response; no match is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from milora.answers import ANSWER_IS as _ANSWER_IS
from milora.answers import extract_math_answer as extract_math_answer
from milora.answers import last_boxed as last_boxed
from milora.answers import math_answers_equivalent as math_answers_equivalent
from milora.errors import DataError

NUMERIC_RTOL = 1e-4
"""Relative tolerance of numeric comparisons: ``|pred - gold| <= NUMERIC_RTOL * max(1, |gold|)``."""


# ---------------------------------------------------------------- math word problems

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_REAL = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(
    rf"(?:(?<![\w)])(?P<sign>-)\s*)?(?:\$\s*(?P<sign2>-)?\s*)?(?P<num>{_REAL})(?:\s*/\s*(?P<den>{_REAL}))?"
)


def _number_value(match: re.Match) -> float | None:
    value = float(match["num"].replace(",", ""))
    if match["den"] is not None:
        denominator = float(match["den"].replace(",", ""))
        if denominator == 0:
            return None
        value /= denominator
    return -value if (match["sign"] or match["sign2"]) else value


def parse_number(text: str) -> float | None:
    """The first number in ``text`` ("$1,234.5", "-18", "3/4", ".5"), or None."""
    for match in _NUMBER.finditer(text):
        value = _number_value(match)
        if value is not None:
            return value
    return None


def extract_number(response: str) -> float | None:
    """The number after the last "The answer is" in a response, else its last number, else None."""
    answer_is = list(_ANSWER_IS.finditer(response))
    if answer_is:
        value = parse_number(response[answer_is[-1].end():])
        if value is not None:
            return value
    values = [v for v in map(_number_value, _NUMBER.finditer(response)) if v is not None]
    return values[-1] if values else None


def gold_number(answer: object) -> float:
    """The gold number of a word problem: GSM8K's ``#### N`` or a plain number (string or numeric)."""
    if isinstance(answer, bool):
        raise DataError(f"Gold answer {answer!r} is a boolean, not a number.")
    if isinstance(answer, (int, float)):
        return float(answer)
    if isinstance(answer, str):
        text = answer.rsplit("####", 1)[1] if "####" in answer else answer
        match = _NUMBER.search(text)
        value = None if match is None else _number_value(match)
        if value is not None and not text[match.end():].strip(" .\n"):
            return value
    raise DataError(
        f"Gold answer {answer!r} is not a number: the math word-problem task needs an `answer` "
        "field that is a number or ends with GSM8K's `#### <number>`."
    )


_CHOICE_GOLD = re.compile(r"\(?([A-E])\)?")
_CHOICE_AFTER_ANSWER_IS = re.compile(r"\s*:?\s*\(?([A-E])\)?(?![A-Za-z0-9])")


def gold_word_problem_answer(answer: object) -> float | str:
    """The gold answer of a word problem: a number (see ``gold_number``) or, for multiple-choice
    sets such as AQuA inside the LLM-Adapters math data, a choice letter A-E."""
    if isinstance(answer, str):
        match = _CHOICE_GOLD.fullmatch(answer.strip())
        if match:
            return match[1]
    return gold_number(answer)


def extract_choice(response: str) -> str | None:
    """The choice letter A-E right after the last "The answer is" ("The answer is (C)."), or None."""
    answer_is = list(_ANSWER_IS.finditer(response))
    if not answer_is:
        return None
    match = _CHOICE_AFTER_ANSWER_IS.match(response, answer_is[-1].end())
    return match[1] if match else None


def word_problem_correct(response: str, gold: float | str) -> tuple[float | str | None, bool]:
    """The prediction extracted from a response and whether it matches the gold answer."""
    if isinstance(gold, str):
        choice = extract_choice(response)
        return choice, choice == gold
    number = extract_number(response)
    return number, numbers_match(number, gold)


def numbers_match(prediction: float | None, gold: float) -> bool:
    """Numeric equality within ``NUMERIC_RTOL`` (relative, absolute below 1)."""
    if prediction is None or not math.isfinite(prediction):
        return False
    return abs(prediction - gold) <= NUMERIC_RTOL * max(1.0, abs(gold))


# MATH (Hendrycks): last_boxed, extract_math_answer and math_answers_equivalent live in milora.answers
# (training's GRPO rewards use them too) and are imported above.


# ---------------------------------------------------------------- commonsense (LLM-Adapters)

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "true/false": ("true", "false"),
    "solution1-2": ("solution1", "solution2"),
    "answer1-5": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ending1-4": ("ending1", "ending2", "ending3", "ending4"),
    "option1-2": ("option1", "option2"),
}
"""The LLM-Adapters label patterns: BoolQ; PIQA; SIQA, ARC and OBQA; HellaSwag; WinoGrande."""

_ANSWER_FORMAT = re.compile(r"answer format:\s*([a-z0-9_/ ]+)", re.IGNORECASE)


def answer_format_options(instruction: str) -> list[str]:
    """The labels listed in an LLM-Adapters instruction's "Answer format: a/b/c" line."""
    match = _ANSWER_FORMAT.search(instruction)
    if match is None:
        return []
    return [option.strip().lower() for option in match[1].split("/") if option.strip()]


def infer_label_set(answers: Iterable[str], instructions: Iterable[str] = ()) -> str:
    """The name of the label set (a key of LABEL_SETS) that holds every gold answer and every
    label of the instructions' "Answer format" lines."""
    seen = {str(answer).strip().lower() for answer in answers}
    for instruction in instructions:
        seen.update(answer_format_options(instruction))
    for name, labels in LABEL_SETS.items():
        if seen and seen <= set(labels):
            return name
    shown = ", ".join(sorted(seen)[:10]) or "none"
    raise DataError(
        f"The labels in this commonsense file ({shown}) match none of the LLM-Adapters label "
        f"patterns ({'; '.join(LABEL_SETS)}): the `answer` field must hold one of those labels."
    )


def extract_label(response: str, labels: Iterable[str]) -> str | None:
    """The first label (in the order they appear) found in the lower-cased response, or None."""
    pattern = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    match = re.search(pattern, response.lower())
    return match[0] if match else None
