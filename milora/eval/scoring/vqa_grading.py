"""Answer normalisation and scoring for visual question answering: pure functions, no model.

- Open answers (VQAv2, GQA, VizWiz, TextVQA): `normalize_answer` is the official VQA evaluation's
  normalisation (EvalAI's, as in lmms-eval): lower case, punctuation removed or replaced by a
  space, periods not followed by a digit removed, number words to digits, articles dropped,
  contractions restored ("dont" -> "don't"). It is applied to the prediction and to every gold
  answer. `vqa_accuracy` is VQAv2's soft accuracy for ten annotator answers: the mean over the ten
  leave-one-out subsets of min(1, matches among the other nine / 3), so an answer given by three
  or more annotators scores 1 and one given by a single annotator 0.3.
- POPE (yes/no object hallucination): `pope_answer` follows the POPE reference evaluation: only
  the first sentence counts, and it is "no" if it holds the word "no", "No" or "not", else "yes".
  `pope_metrics`: accuracy, precision, recall and F1 with "yes" as the positive class, yes-ratio.
- Multiple choice (ScienceQA-IMG, MMBench): `extract_choice_letter`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't", "couldn'tve":
    "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't", 'hadnt':
    "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't", 'hed':
    "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd", 'howll': "how'll", 'hows':
    "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've", 'isnt': "isn't", 'itd': "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt':
    "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt':
    "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt':
    "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've":
    "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've":
    "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's",
    'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've", 'someonell':
    "someone'll", 'someones': "someone's", 'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's", 'thered': "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", 'therere': "there're", 'theres': "there's", 'theyd':
    "they'd", "theyd've": "they'd've", "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve':
    "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've",
    'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens':
    "when's", 'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've":
    "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll",
    'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've":
    "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've":
    "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've"
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_PERIOD = re.compile(r"\.(?!\d)")  # what the official "(?!<=\d)(\.)(?!\d)" does: a period not followed by a digit
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation of one answer (see module docstring)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    original, glued = text, _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:  # a mark next to a space (or in a number) is dropped, inside a word it separates
        text = text.replace(mark, "" if (mark + " " in original or " " + mark in original or glued) else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals one of the normalised gold answers."""
    guess = normalize_answer(prediction)
    return any(guess == normalize_answer(answer) for answer in answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2's soft accuracy of ``prediction`` against the ten annotator ``answers`` (see module docstring)."""
    if len(answers) != 10:
        raise ValueError(f"VQA accuracy needs the 10 annotator answers, got {len(answers)}.")
    guess = normalize_answer(prediction)
    gold = [normalize_answer(answer) for answer in answers]
    return sum(min(1.0, sum(other == guess for j, other in enumerate(gold) if j != i) / 3) for i in range(10)) / 10


def first_line_answer(output: str) -> str:
    """A generated short answer: its first line, stripped (models often add a line of explanation)."""
    return output.strip().split("\n")[0].strip()


# ---------------------------------------------------------------- POPE


def pope_answer(output: str) -> str:
    """"yes" or "no" as the POPE reference evaluation reads a generated answer."""
    text = output.strip().split(".")[0].replace(",", "")
    words = text.split(" ")
    return "no" if any(word in ("No", "not", "no") for word in words) else "yes"


def pope_metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float | None]:
    """Accuracy, precision, recall, F1 ("yes" positive) and the share of "yes" predictions; a ratio
    whose denominator is 0 (no "yes" prediction, no "yes" gold) is None."""
    pairs = list(zip(predictions, golds, strict=False))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = None if precision is None or recall is None else (
        2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "accuracy": sum(p == g for p, g in pairs) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p, _ in pairs) / len(pairs),
    }


# ---------------------------------------------------------------- multiple choice


def extract_choice_letter(output: str, options: Sequence[str]) -> str | None:
    """The option letter (A, B, ...) a generated answer chooses, or None.

    In order: a leading letter ("B", "B.", "(B) ...", "B: ..."), the letter after "answer is", an
    answer that is exactly one option's text (normalised). ``options`` are the option texts in letter order.
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    text = output.strip()
    pattern = "|".join(letters)
    for regex in (rf"^\(?({pattern})\)?(?![A-Za-z0-9])", rf"answer is:?\s*\(?({pattern})\)?(?![A-Za-z0-9])"):
        match = re.search(regex, text, flags=0 if regex.startswith("^") else re.IGNORECASE)
        if match:
            return match[1].upper()
    normalised = normalize_answer(first_line_answer(text))
    matches = [letter for letter, option in zip(letters, options, strict=True)
               if normalize_answer(option) == normalised]
    return matches[0] if len(matches) == 1 else None
