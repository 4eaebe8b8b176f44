"""Final answers of math responses, shared by evaluation (MATH grading) and training (GRPO rewards).

Pure functions, no model: the answer of a response is its last ``\\boxed{}`` (else the text after
the last "The answer is"), and two answers are compared by Hugging Face's ``math-verify``
(LaTeX and plain expressions parsed to sympy). An answer it cannot parse into an expression is
wrong (math-verify alone would compare the raw strings).
"""

from __future__ import annotations

import re

ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
"""The phrase a response states its final answer after (case-insensitive)."""


def _balanced_group(text: str, start: int) -> tuple[str, int] | None:
    """Content of the ``{...}`` group opening at ``text[start]`` and the index after it."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:index], index + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in ``text``, or None."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)(\s*)", text))):
        if text.startswith("{", match.end()):
            group = _balanced_group(text, match.end())
            if group is not None:
                return group[0]
        elif match[1]:
            word = re.match(r"[^\s$]+", text[match.end():])
            if word:
                return word[0]
    return None


def extract_math_answer(response: str) -> str | None:
    """A MATH prediction: the last ``\\boxed{}`` of the response, else the text after the last
    "The answer is" (up to the end of its line, without a final period or ``$`` signs)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    answer_is = list(ANSWER_IS.finditer(response))
    if not answer_is:
        return None
    tail = response[answer_is[-1].end():].lstrip(" :")
    line = tail.split("\n", 1)[0].strip()
    line = re.sub(r"\.\s*$", "", line).strip().strip("$").strip()
    return line or None


def _math_expressions(answer: str) -> list | None:
    """math-verify's parse of one answer (LaTeX, else a plain expression); None when it yields no
    mathematical expression, only the raw string."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    parsed = parse(f"${answer}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    return parsed if any(not isinstance(item, str) for item in parsed) else None


def math_answers_equivalent(prediction: str | None, gold: str | None) -> bool:
    """Whether a MATH prediction equals the gold answer, as math-verify judges it.

    A side that math-verify cannot parse into a mathematical expression (unbalanced braces, a
    bare ``\\sqrt``) counts as wrong, even against an identical gold string.
    """
    if prediction is None or gold is None:
        return False
    from math_verify import verify

    gold_parsed, prediction_parsed = _math_expressions(gold), _math_expressions(prediction)
    return gold_parsed is not None and prediction_parsed is not None and verify(gold_parsed, prediction_parsed)
