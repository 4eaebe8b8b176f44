"""Grader unit tests on hand-written tricky cases (no model)."""

import pytest

from milora.eval.scoring.grading import (
    LABEL_SETS,
    DataError,
    extract_choice,
    extract_label,
    extract_math_answer,
    extract_number,
    gold_number,
    gold_word_problem_answer,
    infer_label_set,
    last_boxed,
    math_answers_equivalent,
    numbers_match,
    word_problem_correct,
)

# ---------------------------------------------------------------- word problems


@pytest.mark.parametrize(
    "response, expected",
    [
        ("The answer is 1,234.", 1234.0),  # thousands separators
        ("She pays 1,000,000 dollars. The answer is 1,000,000", 1e6),
        ("The answer is -5.", -5.0),  # negative
        ("It drops 7 degrees to -$7.50. The answer is -$7.50", -7.5),
        ("He owes $-3. The answer is $-3", -3.0),
        ("The answer is 18.0", 18.0),  # decimal
        ("The answer is .5", 0.5),
        ("The answer is 3/4.", 0.75),  # fraction, evaluated
        ("The answer is $18.", 18.0),  # dollar sign
        ("The answer is: 18", 18.0),  # MetaMath's "The answer is: "
        ("Step: 16-3-4=9 eggs, 9*2 = 18 dollars", 18.0),  # no "The answer is": last number; 16-3 is not -3
        ("First 5 then 7. The answer is 12. Then 99 more", 12.0),  # several numbers: after the LAST answer-is
        ("The answer is 4. Wait, the answer is 6.", 6.0),
        ("the ANSWER IS 42", 42.0),  # case
        ("The answer is unknown. I counted 42 apples", 42.0),  # answer-is without a number: fallback
        ("I cannot solve this.", None),  # no number at all
        ("", None),
        ("The answer is 5/0", None),
        ("The answer is 70,000.\n\nQuestion: what is 5?", 70000.0),
        ("3,4 and 5", 5.0),  # "3,4" is not a thousands group
    ],
)
def test_extract_number(response, expected):
    assert extract_number(response) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Janet sells 9 eggs.\n#### 18", 18.0),
        ("#### 70,000", 70000.0),
        ("#### -3", -3.0),
        ("4.0", 4.0),  # LLM-Adapters `answer` string
        (17, 17.0),
        (2.5, 2.5),
    ],
)
def test_gold_number(answer, expected):
    assert gold_number(answer) == expected


@pytest.mark.parametrize("answer", ["C", "#### eighteen", "18 apples and 3 pears", True, None])
def test_gold_number_rejects_non_numbers(answer):
    with pytest.raises(DataError, match=r"not a number|boolean"):
        gold_number(answer)


def test_numbers_match_tolerance():
    assert numbers_match(18.0, 18.0)  # "18.0" vs "18"
    assert numbers_match(0.33334, 1 / 3)  # within 1e-4 absolute below 1
    assert not numbers_match(0.33, 1 / 3)
    assert numbers_match(1_000_050.0, 1_000_000.0)  # 1e-4 relative above 1
    assert not numbers_match(1_000_200.0, 1_000_000.0)
    assert not numbers_match(None, 18.0)
    assert not numbers_match(float("nan"), 18.0)


def test_multiple_choice_word_problems():
    assert gold_word_problem_answer("C") == "C"
    assert gold_word_problem_answer("(D)") == "D"
    assert gold_word_problem_answer("12.0") == 12.0
    assert extract_choice("So it is 620. The answer is (C).") == "C"
    assert extract_choice("The answer is: E") == "E"
    assert extract_choice("The answer is Cats") is None
    assert extract_choice("(A) 750 (B) 700") is None
    assert word_problem_correct("The answer is (C).", "C") == ("C", True)
    assert word_problem_correct("The answer is 18.", 18.0) == (18.0, True)
    assert word_problem_correct("no idea", 18.0) == (None, False)


# ---------------------------------------------------------------- MATH


def test_last_boxed_balanced_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{x^{2}+\sqrt{3}}") == r"x^{2}+\sqrt{3}"
    assert last_boxed(r"so $\boxed 5$") == "5"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # unbalanced
    assert last_boxed("no box") is None


def test_extract_math_answer():
    assert extract_math_answer(r"... so \boxed{12}. The answer is: 13") == "12"
    assert extract_math_answer("We get x. The answer is: $\\frac{1}{2}$.\nQuestion") == r"\frac{1}{2}"
    assert extract_math_answer("The answer is 5.") == "5"
    assert extract_math_answer("no answer here") is None


@pytest.mark.parametrize(
    "prediction, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac12", r"\frac{1}{2}"),
        (r"\tfrac{1}{2}", "0.5"),
        ("1/2", r"\frac12"),
        ("0.5", r"\dfrac{1}{2}"),
        (r"5\text{ cm}", "5"),  # units
        (r"10 \text{inches}", "10"),
        (r"\text{(A)}", "(A)"),  # a \text{} answer is unwrapped
        (r"30^\circ", "30"),  # degrees
        (r"30^{\circ}", "30"),
        (r"25\%", "25"),  # percentages
        (r"25\%", "0.25"),  # percent variant (a % on one side)
        ("18.0", "18"),
        ("1,000", "1000"),
        ("x = 5", "5"),
        (r"\$5", "5"),
        ("(1, 2]", "(1,2]"),  # intervals
        (r"(-\infty,0)\cup(1,\infty)", r"(-\infty, 0) \cup (1, \infty)"),
        (r"2\sqrt{3}", r"\sqrt{12}"),  # symbolic
        (r"\sqrt3", r"\sqrt{3}"),
        ("x^2+2x+1", "(x+1)^2"),
        ("3+4i", "4i+3"),
        (r"\frac{\pi}{2}", r"\pi/2"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    ],
)
def test_math_equivalent(prediction, gold):
    assert math_answers_equivalent(prediction, gold)


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("0.33", r"\frac13"),
        ("(1,2]", "[1,2]"),  # open vs closed interval
        ("(1,2)", "(2,1)"),
        ("0.25", "25"),  # no % anywhere: no percent variant
        ("2", "3"),
        ("x+1", "x+2"),
        ("1,2", "1,2,3"),
        (None, "5"),
        ("exec", "eval"),
    ],
)
def test_math_not_equivalent(prediction, gold):
    assert not math_answers_equivalent(prediction, gold)


@pytest.mark.parametrize("malformed", [r"\frac{1}{2", r"\sqrt", "{{1}", r"\text{5"])
def test_math_unparseable_answer_is_wrong(malformed):
    # Hendrycks' is_equiv (and math-verify alone) compare raw strings when parsing fails; here an
    # answer that does not parse is wrong even against an identical gold string.
    assert not math_answers_equivalent(malformed, malformed)
    assert not math_answers_equivalent(malformed, "1")


def test_math_verify_reads_a_leading_number_of_a_malformed_answer():
    """Where math-verify is more lenient than the hand-written normaliser it replaced: "5\\frac"
    (a \\frac without arguments) is read as 5 (the old normaliser failed on it: always wrong)."""
    assert math_answers_equivalent(r"5\frac", "5")


def test_math_normalisation_follows_hendrycks():
    """The Hendrycks strip_string rewrites, as equivalences."""
    for written, normal in [(r"\dfrac12", r"\frac{1}{2}"), (r"\frac1{72}", r"\frac{1}{72}"), ("0.5", r"\frac{1}{2}"),
                            ("3/4", r"\frac{3}{4}"), (r"\left(1, 2\right)", "(1,2)"), (" .25", "0.25"),
                            (r"90^\circ", "90")]:
        assert math_answers_equivalent(written, normal), written


HUGE_EXPONENTS = [  # (prediction, gold, equivalent); evaluating any of these towers exactly never ends
    ("2^{1000000}", "2^{1000001}", False),
    ("10^{100}", "10^{100}", True),
    ("2^{2^{2^{30}}}", "2^{2^{2^{30}}}+1", False),
    ("9^{9^{9^{9}}}", "9^{9^{9^{9}}}", True),
    ("10^{10^{100}}", "10^{10^{100}}+1", False),
]


def test_math_huge_exponents_are_graded_in_bounded_time():
    """Grading does not evaluate exponent towers: the five pairs are graded right in a child process
    that is killed after 120 s (they take about 1 s; a grader that expands 2^{2^{2^{30}}} never returns)."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json, sys\nfrom milora.eval.scoring.grading import math_answers_equivalent\n"
              "print(json.dumps([math_answers_equivalent(p, g) for p, g in json.loads(sys.argv[1])]))")
    pairs = [[prediction, gold] for prediction, gold, _ in HUGE_EXPONENTS]
    try:
        child = subprocess.run([sys.executable, "-c", script, json.dumps(pairs)], capture_output=True, text=True,
                               timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    except subprocess.TimeoutExpired:
        pytest.fail("grading the huge exponents did not finish within 120 s")
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout.strip().splitlines()[-1]) == [equivalent for *_, equivalent in HUGE_EXPONENTS]


# ---------------------------------------------------------------- commonsense


@pytest.mark.parametrize(
    "answers, name",
    [
        (["true", "false"], "true/false"),
        (["solution1", "solution2"], "solution1-2"),
        (["answer1", "answer3"], "answer1-5"),
        (["answer5", "answer2"], "answer1-5"),
        (["ending4", "ending1"], "ending1-4"),
        (["option2", "Option1"], "option1-2"),
    ],
)
def test_infer_label_set(answers, name):
    assert infer_label_set(answers) == name


def test_infer_label_set_reads_answer_format():
    instruction = "Pick one\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2"
    assert infer_label_set(["answer1"], [instruction]) == "answer1-5"
    with pytest.raises(DataError, match="match none"):
        infer_label_set(["answer1"], ["Answer format: true/false"])
    with pytest.raises(DataError, match="match none"):
        infer_label_set(["A", "B"])
    with pytest.raises(DataError, match="match none"):
        infer_label_set([])


@pytest.mark.parametrize(
    "response, label_set, expected",
    [
        ("the correct answer is true", "true/false", "true"),
        ("False. It is not true.", "true/false", "false"),  # case, first match wins
        ("Solution2 is better than solution1", "solution1-2", "solution2"),
        ("The correct answer is answer3, because...", "answer1-5", "answer3"),
        ("answer5", "answer1-5", "answer5"),
        ("I think ending4.", "ending1-4", "ending4"),
        ("the correct answer is Option1", "option1-2", "option1"),
        ("The correct answer is: Maria.", "option1-2", None),  # no label
        ("", "true/false", None),
        ("answer6", "answer1-5", None),
    ],
)
def test_extract_label(response, label_set, expected):
    assert extract_label(response, LABEL_SETS[label_set]) == expected
