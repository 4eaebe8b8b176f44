"""Visual question answering: scoring against hand-worked examples (VQA normalisation, VQAv2 soft
accuracy, POPE, option letters), the vqa / pope / mcq-image tasks on a tiny random LLaVA, the
lmms-eval bridge (its error paths, and its model wrapper driven by a stand-in for lmms-eval, which
is not installed here), and the command line."""

from __future__ import annotations

import json
import sys
import types

import pytest

from milora.cli import main
from milora.errors import DataError
from milora.eval import evaluate
from milora.eval.bridges.lmms_eval import greedy_settings, run_lmms_eval
from milora.eval.scoring.vqa_grading import (
    exact_match,
    extract_choice_letter,
    normalize_answer,
    pope_answer,
    pope_metrics,
    vqa_accuracy,
)
from milora.models import load_base_model

from conftest import cli_error, make_llava_dir, make_model_dir, write_images


@pytest.mark.parametrize("raw,normalised", [
    ("Two dogs.", "2 dogs"), ("The Cat", "cat"), ("yes, it is", "yes it is"), ("1,000", "1000"),
    ("dont know", "don't know"), ("3.5 meters.", "3.5 meters"), ("The (big) one", "big 1"), ("x / y", "x y"),
    ("New York-city", "new york city"), ("  Red\n", "red"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize("red,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_hand_worked(red, expected):
    """k of 10 annotators said "red": each leave-one-out subset scores min(1, matches / 3);
    k = 2: two subsets see 1 match (1/3), eight see 2 (2/3): (2/3 + 16/3) / 10 = 0.6."""
    answers = ["red"] * red + ["dark red"] * (10 - red)
    assert vqa_accuracy("Red.", answers) == pytest.approx(expected)
    with pytest.raises(ValueError, match="10 annotator answers"):
        vqa_accuracy("red", ["red"] * 3)


def test_exact_match_normalises_both_sides():
    assert exact_match("A circle.", ["circle"]) and exact_match("two", ["2"]) and not exact_match("circles", ["circle"])


def test_pope_hand_worked():
    outputs = ["Yes, there is.", "No.", "There is not a dog.", "yes", "I think so. No doubt"]
    predictions = [pope_answer(o) for o in outputs]
    assert predictions == ["yes", "no", "no", "yes", "yes"]  # only the first sentence counts
    metrics = pope_metrics(predictions, ["yes", "no", "yes", "no", "yes"])
    # TP = 2 (items 0, 4), FP = 1 (item 3), FN = 1 (item 2), TN = 1 (item 1)
    assert metrics == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                     "yes_ratio": 3 / 5})
    assert pope_metrics(["no", "no"], ["no", "yes"])["precision"] is None


@pytest.mark.parametrize("output,letter", [
    ("B", "B"), ("(C) because it is blue", "C"), ("The answer is D.", "D"), ("blue", "C"), ("A.", "A"),
    ("Bird", None), ("", None), ("E", None),
])
def test_option_letters(output, letter):
    assert extract_choice_letter(output, ["red", "green", "blue", "the sky"]) == letter


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-eval")
    model_dir = make_llava_dir(root / "llava")
    names = write_images(root / "data" / "images", 3)
    vqa = [{"image": f"images/{names[0]}", "question": "What colour?", "answer": "red"},
           {"image": f"images/{names[1]}", "question": "How many?", "answers": ["2"] * 3 + ["two"] * 2 + ["3"] * 5},
           {"image": f"images/{names[2]}", "question": "Shape?",
            "answers": [{"answer": "circle"}, {"answer": "round"}]}]
    pope = [{"image": f"images/{names[i % 3]}", "question": f"Is there a {thing} in the image?", "answer": answer,
             "category": category}
            for i, (thing, answer, category) in enumerate([("dog", "yes", "random"), ("cat", "no", "random"),
                                                           ("car", "no", "adversarial"),
                                                           ("cup", "yes", "adversarial")])]
    mcq = [{"image": f"images/{names[0]}", "question": "Which colour?", "options": ["red", "green"], "answer": 1},
           {"question": "Which is bigger?", "A": "sun", "B": "moon", "answer": "A", "hint": "Astronomy."}]
    files = {}
    for name, records in (("vqa", vqa), ("pope", pope), ("mcq", mcq)):
        files[name] = root / "data" / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    model, processor = load_base_model(str(model_dir))
    return {"root": root, "model_dir": model_dir, "model": model, "processor": processor, **files}


def run(vlm, task, data, **options):
    return evaluate(vlm["model"], vlm["processor"], task, None if data is None else str(data), progress=False,
                    **options)


def test_vqa_task_scores_its_outputs(vlm):
    result = run(vlm, "vqa", vlm["vqa"], batch_size=2, max_new_tokens=4)
    items = result["items"]
    assert result["summary"]["n"] == 3 and result["summary"]["settings"]["soft_accuracy_items"] == 1
    expected = [float(exact_match(items[0]["prediction"], ["red"])),
                vqa_accuracy(items[1]["prediction"], items[1]["gold"]),
                float(exact_match(items[2]["prediction"], ["circle", "round"]))]
    assert [item["score"] for item in items] == expected
    assert result["summary"]["scores"] == {"vqa": pytest.approx(sum(expected) / 3)}
    assert (items[0]["prompt"].count("<image>") == 1
            and "Answer the question using a single word or phrase." in items[0]["prompt"])


def test_batching_does_not_change_answers(vlm):
    one = run(vlm, "vqa", vlm["vqa"], batch_size=1, max_new_tokens=4)["items"]
    three = run(vlm, "vqa", vlm["vqa"], batch_size=3, max_new_tokens=4)["items"]
    assert [i["output"] for i in one] == [i["output"] for i in three]


def test_pope_and_mcq_tasks(vlm):
    pope = run(vlm, "pope", vlm["pope"], max_new_tokens=3)
    predictions = [item["prediction"] for item in pope["items"]]
    expected = pope_metrics(predictions, ["yes", "no", "no", "yes"])
    assert {k: pope["summary"]["scores"][k] for k in expected} == expected
    assert set(pope["summary"]["scores"]) >= {"f1_random", "f1_adversarial"} and pope["summary"]["metric"] == "value"
    mcq = run(vlm, "mcq-image", vlm["mcq"], max_new_tokens=3)
    assert mcq["items"][0]["gold"] == "B" and mcq["items"][1]["gold"] == "A" and mcq["items"][1]["image"] == []
    assert ("Context: Astronomy.\nWhich is bigger?\nA. sun\nB. moon\nAnswer with the option's letter"
            in mcq["items"][1]["prompt"])


def fixed_outputs(monkeypatch, outputs):
    """Stand in for the model's generation only: the tasks score these fixed answers."""
    from milora.eval.tasks import vision

    def generate(model, processor, prompts, images, **options):
        assert len(prompts) == len(outputs) == len(images)
        return list(outputs)

    monkeypatch.setattr(vision, "generate_with_images", generate)


def test_vqa_scores_fixed_answers_hand_worked(vlm, tmp_path, monkeypatch):
    """Outputs "Red.\n...", "two", "square": the first line "Red." matches "red" (1.0); "two" is
    "2" after normalisation, said by 2 of 10 annotators: soft accuracy 0.6 (see the hand-worked
    case above), exact match True; "square" matches nothing (0.0). Mean 1.6 / 3, exact match 2 / 3."""
    records = [json.loads(line) for line in vlm["vqa"].read_text().splitlines()]
    records[1]["answers"] = ["2"] * 2 + ["3"] * 8
    data = vlm["vqa"].parent / "vqa_fixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    fixed_outputs(monkeypatch, ["Red.\nIt is red.", "two", "square"])
    result = run(vlm, "vqa", data)
    assert [item["score"] for item in result["items"]] == [1.0, pytest.approx(0.6), 0.0]
    assert [item["correct"] for item in result["items"]] == [True, True, False]
    assert list(result["summary"]["scores"].values()) == [pytest.approx(1.6 / 3)]
    assert list(result["summary"]["settings"]["exact_match"].values()) == [pytest.approx(2 / 3)]


def test_pope_and_mcq_score_fixed_answers_hand_worked(vlm, monkeypatch):
    """POPE gold yes, no, no, yes (random, random, adversarial, adversarial); answers yes, yes, no,
    yes: TP 2, FP 1, TN 1, FN 0: accuracy 3/4, precision 2/3, recall 1, F1 0.8, yes-ratio 3/4;
    random: TP 1, FP 1: F1 2/3; adversarial: all right: F1 1. MCQ gold B, A; answers "green"
    (option B's text) and "B": accuracy 1/2."""
    fixed_outputs(monkeypatch, ["Yes, there is.", "Yes.", "No.", "yes"])
    pope = run(vlm, "pope", vlm["pope"])
    assert [item["prediction"] for item in pope["items"]] == ["yes", "yes", "no", "yes"]
    assert pope["summary"]["scores"] == pytest.approx({
        "accuracy": 3 / 4, "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "yes_ratio": 3 / 4,
        "f1_random": 2 / 3, "f1_adversarial": 1.0})
    fixed_outputs(monkeypatch, ["green", "B"])
    mcq = run(vlm, "mcq-image", vlm["mcq"])
    assert [item["prediction"] for item in mcq["items"]] == ["B", "B"]
    assert [item["correct"] for item in mcq["items"]] == [True, False]
    assert list(mcq["summary"]["scores"].values()) == [0.5]


def test_bad_data_is_refused_before_generation(vlm, tmp_path):
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nowhere.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"record 0: image .*nowhere.png does not exist"):
        run(vlm, "vqa", missing)
    bad_pope = tmp_path / "pope.jsonl"
    bad_pope.write_text(json.dumps({"image": "x.png", "question": "q", "answer": "maybe"}) + "\n")
    with pytest.raises(DataError, match="a POPE answer is yes or no"):
        run(vlm, "pope", bad_pope)
    text_model, tokenizer = load_base_model(str(make_model_dir(tmp_path / "text")))
    with pytest.raises(DataError, match="needs an image-text-to-text model"):
        evaluate(text_model, tokenizer, "vqa", str(vlm["vqa"]), progress=False)


def test_lmms_eval_missing_is_a_clear_error(vlm, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"lmms-eval tasks need lmms-eval, which is not installed.*milora\[lmms-eval\]"):
        run(vlm, "lmms-eval:vqav2_val_lite", None)
    with pytest.raises(DataError, match="Name the tasks after the colon"):
        run(vlm, "lmms-eval:", None)


def test_lmms_eval_arguments(vlm, tmp_path):
    assert greedy_settings({"max_new_tokens": 5, "until": "\n", "temperature": 0}, "t") == (5, ["\n"])
    assert greedy_settings({}, "t") == (128, [])
    with pytest.raises(DataError, match="sampling or beam search"):
        greedy_settings({"do_sample": True, "temperature": 0.7}, "t")
    with pytest.raises(DataError, match=r"include path .*nowhere does not exist"):
        run_lmms_eval(vlm["model"], vlm["processor"], ["x"], tmp_path / "nowhere", limit=None, batch_size=1)


def fake_lmms_eval(monkeypatch, images):
    """A stand-in for lmms-eval's API (lmms base class, TaskManager, simple_evaluate) that drives the
    wrapper as lmms-eval's evaluator does: sets task_dict, sends generate_until requests."""
    package, api, model_module, evaluator, tasks = (types.ModuleType(name) for name in (
        "lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.evaluator", "lmms_eval.tasks"))

    class Lmms:
        def __init__(self):
            self.task_dict = {}

    class TaskManager:
        def __init__(self, include_path=None):
            self.all_tasks = ["fake_vqa"]

    def simple_evaluate(model, tasks, limit, task_manager, log_samples):
        docs = [{"image": image, "question": f"q{i}"} for i, image in enumerate(images)]
        model.task_dict["fake_vqa"] = {"test": docs}
        requests = [types.SimpleNamespace(args=(f"{doc['question']}\nAnswer briefly.",
                                                {"max_new_tokens": 3, "until": ["\n"]},
                                                lambda d: [d["image"]], i, "fake_vqa", "test"))
                    for i, doc in enumerate(docs)]
        outputs = model.generate_until(requests)
        return {"results": {"fake_vqa": {"exact_match,none": 0.5, "exact_match_stderr,none": 0.1}},
                "samples": {"fake_vqa": [{"doc_id": i, "resps": [[o]], "filtered_resps": [o], "target": "x"}
                                         for i, o in enumerate(outputs)]}}

    model_module.lmms, tasks.TaskManager, evaluator.simple_evaluate = Lmms, TaskManager, simple_evaluate
    for module in (package, api, model_module, evaluator, tasks):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def test_lmms_eval_bridge_generates_with_the_images(vlm, monkeypatch):
    from PIL import Image

    from milora.eval.generation import generate_with_images
    from milora.prompts import apply_chat_template

    images = [Image.open(vlm["root"] / "data" / "images" / f"img{i}.png") for i in range(3)]
    fake_lmms_eval(monkeypatch, images)
    result = run(vlm, "lmms-eval:fake_vqa", None, batch_size=2)
    assert result["summary"]["scores"] == {"fake_vqa": 0.5} and len(result["items"]) == 3
    prompts = [apply_chat_template(vlm["processor"], [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"q{i}\nAnswer briefly."}]}], True) for i in range(3)]
    direct = generate_with_images(vlm["model"], vlm["processor"], prompts, [[image] for image in images],
                                  max_new_tokens=3, progress=False)
    assert [item["prediction"][0] for item in result["items"]] == [text.split("\n")[0] for text in direct]


def test_cli_eval_and_init_on_a_vision_language_model(vlm, tmp_path, capsys):
    output = tmp_path / "results.json"
    assert main(["eval", "--model", str(vlm["model_dir"]), "--task", "vqa", "--data", str(vlm["vqa"]),
                 "--max-new-tokens", "2", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["summary"]["n"] == 3
    assert main(["init", str(vlm["model_dir"]), "--output", str(tmp_path / "adapter"), "--rank", "2",
                 "--modules-to-save", "multi_modal_projector"]) == 0
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["target_modules"].startswith("model\\.language_model")
            and saved["modules_to_save"] == ["multi_modal_projector"])
    merged = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "adapter"), "--model", str(vlm["model_dir"]), "--output", str(merged)]) == 0
    assert (merged / "processor_config.json").is_file()
    assert main(["analyze", str(tmp_path / "adapter"), "--model", str(vlm["model_dir"]), "--output",
                 str(tmp_path / "analysis.json")]) == 0
    layers = json.loads((tmp_path / "analysis.json").read_text())[0]["layers"]
    assert len(layers) == 10 and all(layer["module"].startswith("model.language_model.") for layer in layers)
    error = cli_error(["init", str(vlm["model_dir"]), "--output", str(tmp_path / "other"), "--target-modules", "fc1"])
    assert "not found in the language model" in error and not (tmp_path / "other").exists()
    assert main(["init", str(vlm["model_dir"]), "--output", str(tmp_path / "whole"), "--rank", "2",
                 "--target-modules", "fc1", "--target-scope", "whole_model"]) == 0
