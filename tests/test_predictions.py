"""`--predictions` for the benchmark and image tasks (gsm8k, math, commonsense, vqa, pope, mcq-image):
``<dataset>/<index>`` ids, the same rules as ifeval / alpaca-eval / humaneval (every scored item answered
once, no unknown ids, no generation options), no model and no image opened."""

from __future__ import annotations

import json

import pytest

from milora.cli import main
from milora.errors import DataError
from milora.eval import evaluate

GSM8K = [{"question": f"What is {n} + 1?", "answer": f"{n} + 1 = {n + 1}\n#### {n + 1}"} for n in range(4)]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def gsm8k(tmp_path):
    return _jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K)


def test_gsm8k_predictions_are_graded_like_generations(gsm8k, tmp_path):
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": f"gsm8k/{n}", "output": f"The answer is {n + 1 - (n == 2)}"}
                                                  for n in range(4)])
    result = evaluate(None, None, "gsm8k", gsm8k, predictions=str(answers), progress=False)
    assert [i["id"] for i in result["items"]] == ["gsm8k/0", "gsm8k/1", "gsm8k/2", "gsm8k/3"]
    assert [i["correct"] for i in result["items"]] == [True, True, False, True]
    assert result["summary"]["scores"] == {"gsm8k": 0.75}
    assert result["summary"]["settings"]["predictions"] == str(answers)
    assert "What is 0 + 1?" in result["items"][0]["prompt"]  # the prompt milora would have sent
    # --limit scores the first items; answers for the others may be in the file
    limited = evaluate(None, None, "gsm8k", gsm8k, limit=2, predictions=str(answers), progress=False)
    assert [i["id"] for i in limited["items"]] == ["gsm8k/0", "gsm8k/1"]


@pytest.mark.parametrize(("records", "message"), [
    ([{"id": "gsm8k/0", "output": "1"}, {"id": "gsm8k/9", "output": "1"}], r"1 id\(s\) name no item.*'gsm8k/9'"),
    ([{"id": "gsm8k/0", "output": "1"}, {"id": "gsm8k/0", "output": "2"}], r"more than one line: 'gsm8k/0'"),
    ([{"id": "gsm8k/0", "output": "1"}], r"no answer for 1 of the 2 scored item\(s\): 'gsm8k/1'"),
    ([{"id": "0", "output": "1"}, {"id": "1", "output": "2"}], r"name no item"),  # the dataset is part of the id
])
def test_bad_prediction_files_are_refused(gsm8k, tmp_path, records, message):
    answers = _jsonl(tmp_path / "answers.jsonl", records)
    with pytest.raises(DataError, match=message):
        evaluate(None, None, "gsm8k", gsm8k, limit=2, predictions=str(answers), progress=False)


def test_generation_options_with_predictions_are_refused(gsm8k, tmp_path):
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": f"gsm8k/{n}", "output": "1"} for n in range(4)])
    with pytest.raises(DataError, match=r"scores the predictions file as it is: max_new_tokens"):
        evaluate(None, None, "gsm8k", gsm8k, predictions=str(answers), max_new_tokens=5)
    data = tmp_path / "cs"
    for name in ("ARC-Easy", "boolq"):
        (data / name).mkdir(parents=True)
    (data / "ARC-Easy" / "test.json").write_text(json.dumps(
        [{"instruction": "Pick. Answer format: answer1/answer2", "answer": "answer2"}] * 2))
    (data / "boolq" / "test.json").write_text(json.dumps(
        [{"instruction": "True? Answer format: true/false", "answer": "true"}]))
    answers = _jsonl(tmp_path / "cs.jsonl", [{"id": "ARC-Easy/0", "output": "the correct answer is answer2"},
                                             {"id": "ARC-Easy/1", "output": "answer1"},
                                             {"id": "boolq/0", "output": "true"}])
    with pytest.raises(DataError, match=r"--scorer loglik scores the model's log-likelihoods"):
        evaluate(None, None, "commonsense", data, predictions=str(answers), scorer="loglik")
    result = evaluate(None, None, "commonsense", data, predictions=str(answers), progress=False)
    assert result["summary"]["scores"] == {"ARC-Easy": 0.5, "boolq": 1.0}


def test_image_task_predictions_need_no_model_and_open_no_image(tmp_path):
    pope = _jsonl(tmp_path / "pope.jsonl", [{"image": "absent.png", "question": "Is there a dog?", "answer": a}
                                            for a in ("yes", "no", "no")])
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": f"pope/{i}", "output": o}
                                                  for i, o in enumerate(("Yes", "Yes.", "no"))])
    result = evaluate(None, None, "pope", pope, predictions=str(answers), progress=False)
    assert [i["prediction"] for i in result["items"]] == ["yes", "yes", "no"]
    assert result["summary"]["scores"]["accuracy"] == pytest.approx(2 / 3)
    assert result["items"][0]["id"] == "pope/0" and "Is there a dog?" in result["items"][0]["prompt"]
    with pytest.raises(DataError, match=r"no answer for 1 of the 3"):
        evaluate(None, None, "pope", pope, predictions=str(_jsonl(tmp_path / "few.jsonl", [
            {"id": "pope/0", "output": "yes"}, {"id": "pope/1", "output": "yes"}])), progress=False)


def test_cli_scores_predictions_without_a_model(gsm8k, tmp_path, capsys):
    answers = _jsonl(tmp_path / "mine.jsonl", [{"id": f"gsm8k/{n}", "output": f"#### {n + 1}"} for n in range(4)])
    output = tmp_path / "result.json"
    assert main(["eval", "--task", "gsm8k", "--data", str(gsm8k), "--predictions", str(answers),
                 "--output", str(output)]) == 0
    saved = json.loads(output.read_text())
    assert saved["summary"]["label"] == "mine" and saved["summary"]["scores"] == {"gsm8k": 1.0}
