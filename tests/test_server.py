"""`milora eval --server` against a small local fake of an OpenAI-compatible server: the up-front checks,
the request mapping and the error paths (timeouts, 5xx, 429, half-finished answers, missing choices).
Equality with local generation is tested against a real vLLM in test_vllm.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from milora.errors import AdapterNotFoundError, DataError, ServerError
from milora.eval import evaluate
from milora.eval.server import Retry, ServerModel, base_url, connect, same_model

from conftest import cli_error, tiny_tokenizer

FAST = Retry(attempts=3, backoff_s=0.0, timeout_s=5.0)
GSM8K = [{"question": f"What is {n} + 1?", "answer": f"{n} + 1 = {n + 1}\n#### {n + 1}"} for n in range(6)]


class FakeServer:
    """``/v1/models`` lists ``models``; ``/v1/completions`` answers ``reply(payload, attempt)`` ->
    ``(status, body dict, headers)``; every completion payload is kept in ``payloads``."""

    def __init__(self, models: list[dict], reply):
        self.models, self.reply, self.payloads, self.attempts = models, reply, [], {}
        self.lock = threading.Lock()
        self.lora_calls, self.runtime_lora = [], True
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": fake.models})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("_lora_adapter"):  # vLLM's run-time loading: plain-text answers
                    fake.lora_calls.append((self.path.rsplit("/", 1)[1], payload))
                    status = 200 if fake.runtime_lora else 404
                    if status == 200 and self.path.endswith("/load_lora_adapter"):
                        fake.models.append({"id": payload["lora_name"], "root": payload["lora_path"], "parent": "base"})
                    elif status == 200:
                        fake.models = [m for m in fake.models if m["id"] != payload["lora_name"]]
                    self.send_response(status)
                    self.send_header("Content-Length", "7")
                    self.end_headers()
                    self.wfile.write(b"Success")
                    return
                with fake.lock:
                    fake.payloads.append(payload)
                    attempt = fake.attempts[payload["prompt"]] = fake.attempts.get(payload["prompt"], 0) + 1
                self._send(*fake.reply(payload, attempt))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _answer(text: str, finish: str | None = "stop", choices: int = 1):
    return 200, {"choices": [{"index": i, "text": text, "finish_reason": finish} for i in range(choices)]}, ()


def _echo_number(payload, attempt):
    """'The answer is N + 1' for a gsm8k prompt about N."""
    number = int(payload["prompt"].split("What is ")[1].split(" ")[0])
    return _answer(f" {number} + 1 = {number + 1}. The answer is {number + 1}\n\nQuestion: more")


BASE = {"id": "base", "root": "/models/SmolLM2-135M-Instruct", "parent": None, "max_model_len": 8192}


@pytest.fixture
def serve():
    servers = []

    def start(reply=_echo_number, models=(BASE,)):
        servers.append(FakeServer(list(models), reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def gsm8k_file(tmp_path):
    path = tmp_path / "gsm8k_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    return path


def test_base_url_forms():
    assert base_url("http://h:8000") == base_url("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(ServerError, match="http"):
        base_url("h:8000")


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ServerError, match=r"No OpenAI-compatible server answers at http://127.0.0.1:9/v1.*"
                                          r"--lora-modules"):
        connect("http://127.0.0.1:9")


def test_model_choice_names_what_is_served(serve, tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    lora = {"id": "mine", "root": str(adapter), "parent": "base", "max_model_len": None}
    server = serve(models=(BASE, lora))
    assert connect(server.url).name == "base"  # one base, no adapter asked for
    chosen = connect(server.url, adapter=str(adapter))  # found by its path
    assert (chosen.name, chosen.base, chosen.max_model_len) == ("mine", BASE["root"], 8192)
    assert connect(server.url, served_model="mine", adapter=str(adapter)).name == "mine"
    sglang = connect(server.url, served_model="base:sql")  # SGLang's BASE:NAME adapter, not listed
    assert (sglang.name, sglang.base, sglang.max_model_len) == ("base:sql", BASE["root"], 8192)
    with pytest.raises(ServerError, match=r"does not serve 'theirs'; it serves base \(/models/.*\), mine"):
        connect(server.url, served_model="theirs")
    with pytest.raises(ServerError, match=r"no adapter from .*other.*--served-model NAME.*--lora-modules NAME="):
        connect(server.url, adapter=str(other))
    with pytest.raises(ServerError, match=r"'mine' on .* is the adapter .*adapter, not --adapter .*other"):
        connect(server.url, served_model="mine", adapter=str(other))


def test_a_server_with_another_base_is_refused(serve, tmp_path):
    server = serve()
    with pytest.raises(ServerError, match=r"serves the base /models/SmolLM2-135M-Instruct, but the adapter's base is "
                                          r"/x/Qwen2-0.5B"):
        connect(server.url, adapter_base="/x/Qwen2-0.5B")
    with pytest.raises(ServerError, match=r"--model \(the tokenizer's model\) is /x/Qwen2-0.5B"):
        connect(server.url, local_model="/x/Qwen2-0.5B")
    assert connect(server.url, adapter_base="HuggingFaceTB/SmolLM2-135M-Instruct").name == "base"


def test_same_model_compares_local_paths_exactly(tmp_path):
    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "b" / "m").mkdir(parents=True)
    assert not same_model(str(tmp_path / "a" / "m"), str(tmp_path / "b" / "m"))  # both here: the same directory
    assert same_model(str(tmp_path / "a" / "m"), str(tmp_path / "a" / "m" / "."))
    assert same_model("/remote/m", str(tmp_path / "a" / "m"))  # a remote path: its name


def test_requests_carry_the_prompt_text_and_decoding_options_in_order(serve, tokenizer):
    server = serve(reply=lambda payload, attempt: _answer(payload["prompt"][-3:] + " STOP more"))
    model = connect(server.url, concurrency=3, retry=FAST)
    prompts = [f"prompt number {i:03d}" for i in range(20)]
    outputs = model.generate(tokenizer, prompts, max_new_tokens=7, stop_strings=("STOP",), progress=False)
    assert outputs == [f"{i:03d} " for i in range(20)]  # prompt order, cut at the stop string
    greedy = server.payloads[0]
    assert {k: greedy[k] for k in ("model", "max_tokens", "n", "temperature", "top_p", "stop")} == {
        "model": "base", "max_tokens": 7, "n": 1, "temperature": 0.0, "top_p": 1.0, "stop": ["STOP"]}
    assert "seed" not in greedy and "add_special_tokens" not in greedy  # the tiny tokenizer adds no special tokens
    assert sorted(p["prompt"] for p in server.payloads) == prompts  # the text exactly as rendered
    server.payloads.clear()
    model.generate(tokenizer, ["a", "a"], max_new_tokens=3, temperature=0.8, top_p=0.9, seed=5, progress=False)
    assert sorted((p["temperature"], p["top_p"], p["seed"]) for p in server.payloads) == [(0.8, 0.9, 5), (0.8, 0.9, 6)]


def test_stop_strings_sent_are_at_most_four_and_cut_first():
    from milora.eval.server import server_stop_strings
    from milora.prompts import MATH_STOP_STRINGS

    assert server_stop_strings(MATH_STOP_STRINGS) == ["Question", "USER", "ASSISTANT", "Instruction"]
    assert server_stop_strings(("\nclass", "\ndef", "\ndef", "\n#")) == ["\nclass", "\ndef", "\n#"]


def test_an_unsent_stop_string_still_cuts_the_text(serve, tokenizer):
    from milora.prompts import MATH_STOP_STRINGS

    server = serve(reply=lambda payload, attempt: _answer(" 2 + 2 = 4. Response: more USER: even more"))
    outputs = connect(server.url, retry=FAST).generate(tokenizer, ["q"], max_new_tokens=9,
                                                       stop_strings=MATH_STOP_STRINGS, progress=False)
    assert "Response" not in server.payloads[0]["stop"] and outputs == [" 2 + 2 = 4. "]


def test_transient_failures_are_retried(serve, tokenizer):
    def flaky(payload, attempt):
        if attempt == 1:
            return 503, {"error": "overloaded"}, ()
        if attempt == 2:
            return 429, {"error": "slow down"}, (("Retry-After", "0"),)
        return _answer("ok")

    server = serve(reply=flaky)
    model = connect(server.url, retry=FAST)
    assert model.generate(tokenizer, ["x", "y"], max_new_tokens=2, progress=False) == ["ok", "ok"]
    assert server.attempts == {"x": 3, "y": 3}


def test_at_most_the_concurrency_is_in_flight_and_reached(serve, tokenizer):
    """docs/serving.md: "at most --server-concurrency (default 8) in flight". Each answer waits until 8
    requests are in the server at once (a barrier; a client sending fewer breaks it after 30 s), then holds
    them 0.2 s, and the server counts how many it holds: never more than 8, for 24 prompts."""
    barrier, state = threading.Barrier(8, timeout=30), {"now": 0, "most": 0}
    lock = threading.Lock()

    def crowded(payload, attempt):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            barrier.wait()
            time.sleep(0.2)  # hold the 8 a moment: a 9th request sent with them would be counted
        finally:
            with lock:
                state["now"] -= 1
        return _answer("ok")

    server = serve(reply=crowded)
    model = connect(server.url, retry=Retry(attempts=1, backoff_s=0.0, timeout_s=60.0))
    assert model.concurrency == 8
    prompts = [f"p{i}" for i in range(24)]
    assert model.generate(tokenizer, prompts, max_new_tokens=2, progress=False) == ["ok"] * 24
    assert state["most"] == 8 and not barrier.broken


def test_backoff_doubles_and_a_longer_retry_after_wins(serve, tokenizer, monkeypatch):
    """docs/serving.md: retried "with exponential backoff (5 attempts)", "honouring Retry-After": the default
    Retry waits 1, 2, 4, 8 s between 5 attempts (sleep recorded, not slept); a 429 asking for 30 s gets 30 s."""
    import milora.eval.server

    waits = []
    monkeypatch.setattr(milora.eval.server.time, "sleep", waits.append)
    server = serve(reply=lambda payload, attempt: (503, {"error": "overloaded"}, ()))
    with pytest.raises(ServerError, match=r"after 5 attempts"):
        connect(server.url).generate(tokenizer, ["x"], max_new_tokens=2, progress=False)
    assert waits == [1.0, 2.0, 4.0, 8.0] and server.attempts == {"x": 5}
    waits.clear()
    patient = serve(reply=lambda p, attempt: (429, {"error": "later"}, (("Retry-After", "30"),)) if attempt == 1
                    else _answer("ok"))
    assert connect(patient.url).generate(tokenizer, ["y"], max_new_tokens=2, progress=False) == ["ok"]
    assert waits == [30.0]


@pytest.mark.parametrize(("reply", "reason"), [
    (lambda p, a: _answer("ok", choices=0), r"0 choice\(s\) for n=1"),
    (lambda p, a: _answer("half", finish=None), r"a half-finished answer \(finish_reason None\)"),
    (lambda p, a: _answer("half", finish="abort"), r"a half-finished answer \(finish_reason 'abort'\)"),
    (lambda p, a: (500, {"error": "boom"}, ()), r"HTTP 500: .*boom.* \(after 3 attempts\)"),
])
def test_answers_that_stay_broken_fail_the_call_and_are_counted(serve, tokenizer, reply, reason):
    server = serve(reply=lambda payload, attempt: reply(payload, attempt) if payload["prompt"] != "good"
                   else _answer("fine"))
    model = connect(server.url, retry=FAST)
    with pytest.raises(ServerError, match=r"2 of 3 requests to .* failed \(item 0: " + reason +
                                          r".*no results were written"):
        model.generate(tokenizer, ["bad", "good", "worse"], max_new_tokens=2, progress=False)
    assert server.attempts == {"bad": 3, "good": 1, "worse": 3}


def test_a_client_error_is_not_retried_and_shows_the_servers_message(serve, tokenizer):
    server = serve(reply=lambda p, a: (400, {"message": "This model's maximum context length is 64 tokens"}, ()))
    model = connect(server.url, retry=FAST)
    with pytest.raises(ServerError, match=r"1 of 1 requests .* HTTP 400: .*maximum context length is 64"):
        model.generate(tokenizer, ["x"], max_new_tokens=2, progress=False)
    assert server.attempts == {"x": 1}


def test_a_prompt_longer_than_the_servers_context_is_refused_before_any_request(serve, tokenizer):
    server = serve(models=({**BASE, "max_model_len": 20},))
    model = connect(server.url, retry=FAST)
    with pytest.raises(ServerError, match=r"1 of 2 prompts do not fit the server's context of 20 tokens with 10 new "
                                          r"tokens .*--max-model-len"):
        model.generate(tokenizer, ["short", "a much longer prompt " * 5], max_new_tokens=10, progress=False)
    assert server.payloads == []


def test_gsm8k_through_a_server_gives_the_local_result_format(serve, tokenizer, gsm8k_file):
    server = serve()
    model = connect(server.url, retry=FAST)
    result = evaluate(model, tokenizer, "gsm8k", gsm8k_file, limit=4, progress=False)
    assert [i["id"] for i in result["items"]] == ["gsm8k/0", "gsm8k/1", "gsm8k/2", "gsm8k/3"]
    assert all(i["correct"] for i in result["items"]) and result["summary"]["scores"] == {"gsm8k": 1.0}
    assert result["items"][0]["output"] == " 0 + 1 = 1. The answer is 1\n\n"  # cut at "Question:"
    # requests run concurrently, so they reach the server in any order: the same texts as the items' prompts
    assert sorted(p["prompt"] for p in server.payloads) == sorted(i["prompt"] for i in result["items"])
    assert result["summary"]["settings"]["served_model"] == "base"


def test_tasks_that_need_the_model_itself_refuse_a_server(serve, tokenizer, gsm8k_file, tmp_path):
    model = ServerModel("http://127.0.0.1:9/v1", "base", None, None)
    with pytest.raises(DataError, match=r"Task forgetting runs on a local model only, not through --server "
                                        r"\(tasks that can: .*gsm8k"):
        evaluate(model, tokenizer, "forgetting", tmp_path / "x.txt")
    data = tmp_path / "piqa.json"
    data.write_text(json.dumps([{"instruction": "Which? Answer format: solution1/solution2", "answer": "solution1"}]))
    with pytest.raises(DataError, match=r"--scorer loglik\) runs on a local model only"):
        evaluate(model, tokenizer, "commonsense", data, scorer="loglik", progress=False)


def test_cli_server_errors_come_before_anything_loads(tmp_path):
    message = cli_error(["eval", "--task", "vqa", "--server", "http://127.0.0.1:9", "--data", str(tmp_path)])
    assert "Task vqa runs on a local model only, not through --server" in message
    message = cli_error(["eval", "--task", "gsm8k", "--server", "http://127.0.0.1:9", "--device", "cpu"])
    assert "--server generates on the server: drop" in message
    message = cli_error(["eval", "--task", "gsm8k", "--server", "http://127.0.0.1:9", "--adapter", str(tmp_path)])
    assert "holds no adapter_config.json" in message


def test_read_served_adapter_errors(tmp_path):
    from milora.adapter.serving import read_served_adapter

    with pytest.raises(AdapterNotFoundError, match=r"holds no adapter_config\.json"):
        read_served_adapter(tmp_path)
    Path(tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(Exception, match=r"not a PEFT LoRA config with a rank `r`"):
        read_served_adapter(tmp_path)


def test_serve_line_names_the_exported_rank_and_every_adapter(tmp_path):
    from milora.adapter.serving import adapter_name, serve_hint, vllm_lora_rank

    for name, rank, base in (("run-a", 32, "/m/base"), ("run-b", 130, "/m/base"), ("run-c", 8, "/m/other")):
        (tmp_path / name / "checkpoint-5").mkdir(parents=True)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": base}))
    assert adapter_name(tmp_path / "run-a" / "checkpoint-5") == "run-a-checkpoint-5"
    assert [vllm_lora_rank(r) for r in (1, 2, 16, 17, 300, 512)] == [1, 8, 16, 32, 320, 512]
    with pytest.raises(Exception, match=r"above vLLM's largest --max-lora-rank \(512\).*milora merge"):
        vllm_lora_rank(513)
    hint = serve_hint([tmp_path / "run-a"])
    assert (f"--model /m/base --enable-lora --lora-modules run-a={tmp_path / 'run-a'} --max-lora-rank 32 --port 8000"
            in hint) and "--served-model run-a --model /m/base" in hint
    hint = serve_hint([tmp_path / "run-a", tmp_path / "run-b"], names=["x", "y"])
    assert f"x={tmp_path / 'run-a'} y={tmp_path / 'run-b'} --max-lora-rank 256 --max-loras 2" in hint
    with pytest.raises(Exception, match="different bases"):
        serve_hint([tmp_path / "run-a", tmp_path / "run-c"])


def test_runtime_adapter_is_loaded_for_the_block_and_unloaded_after(serve, tmp_path):
    from milora.eval.server import runtime_adapter

    server = serve()
    with runtime_adapter(server.url, "run-1", str(tmp_path)) as name:
        assert name == "run-1"
        assert server.lora_calls == [("load_lora_adapter", {"lora_name": "run-1", "lora_path": str(tmp_path)})]
    assert server.lora_calls[1] == ("unload_lora_adapter", {"lora_name": "run-1"})
    server.runtime_lora = False  # a server started without VLLM_ALLOW_RUNTIME_LORA_UPDATING has no such route
    with pytest.raises(ServerError, match=r"did not load the adapter .*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"), \
            runtime_adapter(server.url, "run-2", str(tmp_path)):
        pass


def test_a_sweep_evaluates_each_run_on_the_server_with_its_adapter_loaded_at_run_time(serve, tmp_path):
    from milora.comparison import compare
    from milora.errors import ConfigError

    from conftest import QUESTIONS, commonsense_records, make_model_dir

    (tmp_path / "train.json").write_text(json.dumps(commonsense_records(QUESTIONS[:40])))
    (tmp_path / "test.json").write_text(json.dumps(commonsense_records(QUESTIONS[40:64])))
    server = serve(reply=lambda payload, attempt: _answer(" the correct answer is true"),
                   models=({**BASE, "root": str(make_model_dir(tmp_path / "model"))},))
    values = {
        "output_dir": str(tmp_path / "out"), "methods": ["lora"], "learning_rates": [0.01, 0.02], "seeds": [0],
        "train": {"model": str(tmp_path / "model"), "dataset": str(tmp_path / "train.json"), "lora_rank": 2,
                  "max_steps": 2, "per_device_train_batch_size": 4, "report_to": "none", "cutoff_len": 128,
                  "logging_steps": 1, "save_steps": 100},
        "eval_task": "commonsense", "eval_data": str(tmp_path / "test.json"), "validation_size": 8,
        "eval_server": server.url, "forgetting": False, "analyze": False,
    }
    with pytest.raises(ConfigError, match="scorer: loglik needs the model's logits"):
        compare({**values, "eval_options": {"scorer": "loglik"}}, progress=False)
    with pytest.raises(ServerError, match="No OpenAI-compatible server answers"):
        compare({**values, "eval_server": "http://127.0.0.1:9/v1"}, progress=False)
    summary = compare(values, progress=False)
    runs = sorted((r for r in summary["runs"] if r["method"] == "lora"), key=lambda r: r["learning_rate"])
    assert [r["status"] for r in runs] == ["done", "done"], runs
    names = [Path(r["adapter_dir"]).parent.name for r in runs]
    # each run's adapter loaded for its validation, and the chosen run's (the tie: the smaller rate) again
    # for the test phase
    assert [call[0] for call in server.lora_calls] == ["load_lora_adapter", "unload_lora_adapter"] * 3
    assert sorted(call[1]["lora_name"] for call in server.lora_calls) == sorted(names * 2 + [names[0]] * 2)
    assert {call[1]["lora_path"] for call in server.lora_calls[::2]} == {str(Path(r["adapter_dir"]).resolve())
                                                                           for r in runs}
    served = {p["model"] for p in server.payloads}
    assert served == {*names, "base"}  # each run's adapter for validation and test, the base for the base's scores
    assert runs[1]["test_accuracy"] is None and not (Path(runs[1]["adapter_dir"]).parent / "test.json").exists()
    run = runs[0]
    test = json.loads((Path(run["adapter_dir"]).parent / "test.json").read_text())
    assert test["summary"]["settings"]["served_model"] == names[0] and test["summary"]["n"] == 24
