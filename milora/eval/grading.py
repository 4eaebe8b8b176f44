"""Answer extraction and grading for the paper's benchmarks: pure functions, no model.

- Math word problems (GSM8K, the LLM-Adapters math sets): the prediction is the number after
  the last "The answer is" (falling back to the last number in the response); a prediction is
  correct when ``|pred - gold| <= NUMERIC_RTOL * max(1, |gold|)``. Multiple-choice items (AQuA,
  gold A-E) take the letter right after the last "The answer is".
- MATH (Hendrycks): the gold answer is the content of the last ``\\boxed{}``; both sides are
  normalised as in the Hendrycks ``strip_string`` protocol, then compared as strings, as
  numbers (same tolerance) or symbolically with sympy. An answer that cannot be normalised
  is always wrong (the reference ``is_equiv`` falls back to raw string equality instead).
- Commonsense (LLM-Adapters format): the prediction is the first match of the task's label
  pattern in the lower-cased response; no match is wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from milora.errors import DataError

NUMERIC_RTOL = 1e-4
"""Relative tolerance of numeric comparisons: ``|pred - gold| <= NUMERIC_RTOL * max(1, |gold|)``."""


# ---------------------------------------------------------------- math word problems

_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_REAL = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(
    rf"(?:(?<![\w)])(?P<sign>-)\s*)?(?:\$\s*(?P<sign2>-)?\s*)?(?P<num>{_REAL})(?:\s*/\s*(?P<den>{_REAL}))?"
)
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


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


# ---------------------------------------------------------------- MATH (Hendrycks)


class NormalizationError(ValueError):
    """A MATH answer that the normaliser cannot handle (such answers are graded wrong)."""


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
    answer_is = list(_ANSWER_IS.finditer(response))
    if not answer_is:
        return None
    tail = response[answer_is[-1].end():].lstrip(" :")
    line = tail.split("\n", 1)[0].strip()
    line = re.sub(r"\.\s*$", "", line).strip().strip("$").strip()
    return line or None


def _check_braces(text: str) -> None:
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            raise NormalizationError(f"unbalanced braces in {text!r}")
    if depth:
        raise NormalizationError(f"unbalanced braces in {text!r}")


def _remove_text_groups(text: str) -> str:
    """``5\\text{ cm}`` -> ``5`` (units: the group and what follows it go, as in the reference);
    ``\\text{(A)}`` -> ``(A)`` (a group that starts the answer is unwrapped)."""
    while True:
        match = re.search(r"\\(?:text|textbf|mbox|mathrm)\s*\{", text)
        if match is None:
            return text
        group = _balanced_group(text, match.end() - 1)
        if group is None:
            raise NormalizationError(f"unbalanced \\text group in {text!r}")
        content, end = group
        left = text[:match.start()].rstrip()
        if left and (left[-1].isdigit() or left[-1] in ")}"):
            text = left
        else:
            text = text[:match.start()] + content + text[end:]


def _fix_sqrt(text: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    parts = text.split("\\sqrt")
    fixed = parts[0]
    for part in parts[1:]:
        if not part:
            raise NormalizationError(f"\\sqrt without an argument in {text!r}")
        fixed += "\\sqrt" + (part if part[0] in "{[" else "{" + part[0] + "}" + part[1:])
    return fixed


def _fix_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    parts = text.split("\\frac")
    fixed = parts[0]
    for part in parts[1:]:
        fixed += "\\frac"
        if part.startswith("{"):
            fixed += part
            continue
        if len(part) < 2:
            raise NormalizationError(f"\\frac without two arguments in {text!r}")
        numerator, denominator, rest = part[0], part[1], part[2:]
        fixed += "{" + numerator + "}" + (denominator + rest if denominator == "{" else "{" + denominator + "}" + rest)
    return fixed


def _fix_a_slash_b(text: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` for plain integers."""
    match = re.fullmatch(r"(-?\d+)/(\d+)", text)
    return f"\\frac{{{match[1]}}}{{{match[2]}}}" if match else text


def normalize_math_answer(answer: str) -> str:
    """Hendrycks-style normal form of a MATH answer; raises NormalizationError on malformed input."""
    text = answer.replace("\n", "").replace("\\!", "").strip()
    _check_braces(text)
    text = text.replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "")
    text = text.replace("\\$", "").replace("$", "")
    text = _remove_text_groups(text)
    text = text.replace("\\%", "").replace("%", "")
    text = re.sub(r"\\[,;: ]", "", text).replace("{,}", ",")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    text = text.strip()
    if text.startswith("."):
        text = "0" + text
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        text = sides[1]
    text = _fix_sqrt(text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    if text == "0.5":
        text = "\\frac{1}{2}"
    text = _fix_a_slash_b(text)
    if not text:
        raise NormalizationError(f"nothing left of {answer!r} after normalisation")
    return text


_LATEX_NAMES = {"pi": "pi", "infty": "oo", "cdot": "*", "times": "*", "div": "/"}
_ALLOWED_NAMES = {"sqrt", "pi", "oo"}


def _group_or_char(text: str, index: int) -> tuple[str, int]:
    if index >= len(text):
        raise NormalizationError("missing argument")
    if text[index] == "{":
        group = _balanced_group(text, index)
        if group is None:
            raise NormalizationError("unbalanced braces")
        return group
    return text[index], index + 1


def _latex_to_python(text: str) -> str:
    """A normalised LaTeX answer as a Python/sympy expression string (a small, closed subset)."""
    out = []
    index = 0
    while index < len(text):
        if text.startswith("\\frac", index):
            numerator, index = _group_or_char(text, index + 5)
            denominator, index = _group_or_char(text, index)
            out.append(f"(({_latex_to_python(numerator)})/({_latex_to_python(denominator)}))")
        elif text.startswith("\\sqrt", index):
            index += 5
            root = "2"
            if index < len(text) and text[index] == "[":
                close = text.find("]", index)
                if close < 0:
                    raise NormalizationError("unclosed \\sqrt[")
                root, index = _latex_to_python(text[index + 1:close]), close + 1
            radicand, index = _group_or_char(text, index)
            out.append(f"(({_latex_to_python(radicand)})**(1/({root})))")
        elif text[index] == "\\":
            name = re.match(r"\\([a-zA-Z]+)", text[index:])
            if name is None or name[1] not in _LATEX_NAMES:
                raise NormalizationError(f"unsupported LaTeX in {text!r}")
            out.append(f" {_LATEX_NAMES[name[1]]} ")
            index += len(name[0])
        elif text[index] in "{}":
            out.append("(" if text[index] == "{" else ")")
            index += 1
        elif text[index] == "^":
            out.append("**")
            index += 1
        else:
            out.append(text[index])
            index += 1
    return "".join(out)


def _sympy_value(text: str):
    """A sympy expression for a normalised answer, or None when it is not a plain expression."""
    import sympy
    from sympy.parsing.sympy_parser import (
        implicit_multiplication,
        parse_expr,
        standard_transformations,
    )

    try:
        expression = _latex_to_python(text)
    except NormalizationError:
        return None
    if len(expression) > 200 or not re.fullmatch(r"[0-9A-Za-z+\-*/().\s]*", expression):
        return None
    names = set(re.findall(r"[A-Za-z]+", expression))
    if any(len(name) > 1 and name not in _ALLOWED_NAMES for name in names):
        return None
    local = {name: sympy.Symbol(name) for name in names if len(name) == 1}
    global_dict = {"__builtins__": {}}
    for name in ("Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow", "sqrt", "pi", "oo"):
        global_dict[name] = getattr(sympy, name)
    try:
        return parse_expr(
            expression,
            local_dict=local,
            global_dict=global_dict,
            transformations=standard_transformations + (implicit_multiplication,),
            evaluate=False,
        )
    except Exception:  # sympy's parser raises many unrelated types on malformed input: unparseable
        return None


def _close(a: complex, b: complex) -> bool:
    return abs(a - b) <= NUMERIC_RTOL * max(1.0, abs(b))


def _values_equal(a, b, percent: bool) -> bool:
    """Numeric (exact values, percent variants) or symbolic equality of two sympy expressions."""
    import sympy

    if a == b:
        return True
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    points = [{s: sympy.Float(1.13 + 0.71 * k + 0.29 * p) for k, s in enumerate(symbols)} for p in range(3)]
    try:
        for point in points if symbols else [{}]:
            value_a = complex(sympy.N(a, 20, subs=point))
            value_b = complex(sympy.N(b, 20, subs=point))
            scales = (1.0, 100.0, 0.01) if percent and not symbols else (1.0,)
            if not any(_close(value_a * scale, value_b) for scale in scales):
                return False
        return True
    except Exception:  # sympy evaluation failures of any type count as "not equal", never as equal
        return False


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _equivalent(a: str, b: str, percent: bool) -> bool:
    if a == b:
        return True
    if "\\cup" in a or "\\cup" in b:
        parts_a, parts_b = a.split("\\cup"), b.split("\\cup")
        return len(parts_a) == len(parts_b) and all(_equivalent(x, y, percent) for x, y in zip(parts_a, parts_b))
    bracketed = re.compile(r"[(\[].*[)\]]")
    if bracketed.fullmatch(a) and bracketed.fullmatch(b) and ("," in a or "," in b):
        if (a[0], a[-1]) != (b[0], b[-1]):
            return False
        return _equivalent(a[1:-1], b[1:-1], percent)
    parts_a, parts_b = _split_top_level(a), _split_top_level(b)
    if len(parts_a) > 1 or len(parts_b) > 1:
        return len(parts_a) == len(parts_b) and all(_equivalent(x, y, percent) for x, y in zip(parts_a, parts_b))
    value_a, value_b = _sympy_value(a), _sympy_value(b)
    return value_a is not None and value_b is not None and _values_equal(value_a, value_b, percent)


def math_answers_equivalent(prediction: str | None, gold: str | None) -> bool:
    """Whether a MATH prediction matches the gold answer (strings after normalisation, numbers,
    or sympy expressions). Percent variants (x, x/100, 100x) count only when either side has a %.
    An answer that cannot be normalised is wrong."""
    if prediction is None or gold is None:
        return False
    try:
        a, b = normalize_math_answer(prediction), normalize_math_answer(gold)
    except NormalizationError:
        return False
    return _equivalent(a, b, percent="%" in prediction or "%" in gold)


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
