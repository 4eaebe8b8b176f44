"""`milora eval --server` against a real vLLM (CPU build) serving the embedded SmolLM2 and a trained adapter:
the server's answers equal local generation's on 30 math and 30 commonsense items.

Run with ``pytest -m vllm tests/test_vllm.py`` after ``make vllm-env`` (or point ``MILORA_VLLM_PYTHON`` at
another vLLM environment's python); skipped without one. ``MILORA_VLLM_ADAPTER`` reuses a trained adapter
(one trained on Alpaca-template data: the demo's chat-template adapter gives empty outputs on these
prompts, which the test refuses as a vacuous comparison); otherwise a short MiLoRA run on 80 math records
makes one. The base model alone is compared too. Takes 10-20 minutes
on a 2-core CPU, most of it vLLM's start (torch.compile warm-up) and local generation.

Tolerance: greedy decoding in float32 on both sides (vLLM ``--dtype float32``, LoRA in the model's
dtype), the prompt sent as the same text: the outputs are expected identical. vLLM's CPU kernels sum in
another order than PyTorch's, so a greedy choice between two tokens whose logits are within float32
rounding can go the other way; an item that differs must therefore differ first at a near-tie of the
local model (top-2 logit gap below `NEAR_TIE`), and every difference is printed with that gap.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from milora.eval import evaluate

from conftest import SHARED_DATA, needs_data

pytestmark = [pytest.mark.vllm, pytest.mark.slow, needs_data(SHARED_DATA / "math"),
              needs_data(SHARED_DATA / "commonsense")]

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("MILORA_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
NEAR_TIE = 0.05  # logits; float32 kernel differences are ~1e-4 on this model, real preferences are >> 0.05
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--seed", "0"]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache (CPU); the RAM share of --gpu-memory-utilization
              "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}  # as `milora compare`'s eval_server needs

if not VLLM_PYTHON.is_file():
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (make vllm-env, or set MILORA_VLLM_PYTHON)",
                allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _asked_for(request):
    """Only with ``-m vllm``: the whole suite stays well under its time budget even where vLLM is installed."""
    expression = request.config.getoption("markexpr") or ""
    if "vllm" not in expression or "not vllm" in expression:
        pytest.skip("real-vLLM tests run with -m vllm")


def _train_adapter(directory: Path) -> Path:
    """A short MiLoRA run (rank 16, saved as rank 32) on 80 MetaMath-style math records in the Alpaca
    template the evaluation prompts use: it moves the outputs while keeping them chains of thought
    (the demo's chat-template adapter answers the Alpaca prompts with an empty string)."""
    from milora.demos.text import demo_train_config
    from milora.training.run import train

    records = json.loads((SHARED_DATA / "math" / "math_data.json").read_text())[:80]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {**demo_train_config(directory, max_steps=10, learning_rate=5e-4), "template": "alpaca",
              "cutoff_len": 256}
    return Path(train(config).adapter_dir)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    given = os.environ.get("MILORA_VLLM_ADAPTER")
    return Path(given) if given else _train_adapter(tmp_path_factory.mktemp("vllm-adapter"))


@pytest.fixture(scope="module")
def server(adapter, tmp_path_factory):
    from milora.eval.vllm_process import VllmServer
    from milora.models import embedded_model_dir

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with VllmServer(str(VLLM_PYTHON), str(embedded_model_dir()), log, adapters={"tuned": str(adapter)},
                    extra=SERVER_ARGS, env=SERVER_ENV) as running:
        print(f"\nvLLM answered after {running.started_s:.0f} s ({log})")
        yield running


@pytest.fixture(scope="module")
def local(adapter):
    """The adapter rebuilt on the base (residual + rank-r factors), and the base alone, loaded separately
    (`load_model` changes its base in place)."""
    from milora.adapter.load import load_model
    from milora.models import load_base_model

    base, tokenizer = load_base_model(None)
    return load_model(base, adapter), load_base_model(None)[0], tokenizer


@pytest.fixture(scope="module")
def commonsense_data(tmp_path_factory) -> Path:
    """The first 5 items of each of the 6 commonsense datasets: 30 items."""
    folder = tmp_path_factory.mktemp("commonsense")
    for source in sorted((SHARED_DATA / "commonsense").glob("*/test.json")):
        (folder / source.parent.name).mkdir()
        shutil.copy(source, folder / source.parent.name / "test.json")
    return folder


def _near_tie_gap(model, tokenizer, prompt: str, ours: str, theirs: str) -> float:
    """The local model's top-2 logit gap at the first token where the two completions part."""
    start = len(tokenizer(prompt)["input_ids"])
    a, b = tokenizer(prompt + ours)["input_ids"], tokenizer(prompt + theirs)["input_ids"]
    split = next((i for i in range(start, min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    with torch.inference_mode():
        logits = model(torch.tensor([a[:split]])).logits[0, -1].double()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def _compare(model, tokenizer, local_result: dict, served_result: dict) -> list[dict]:
    assert [i["id"] for i in local_result["items"]] == [i["id"] for i in served_result["items"]]
    differing = []
    for ours, theirs in zip(local_result["items"], served_result["items"], strict=True):
        assert ours["prompt"] == theirs["prompt"]
        if ours["output"] != theirs["output"]:
            differing.append({"id": ours["id"], "local": ours["output"], "server": theirs["output"],
                              "same_prediction": ours["prediction"] == theirs["prediction"],
                              "top2_gap": _near_tie_gap(model, tokenizer, ours["prompt"], ours["output"],
                                                        theirs["output"])})
    return differing


def _check_equal(label: str, model, tokenizer, local_result: dict, served_result: dict) -> None:
    """The served outputs equal the local ones but at near-ties (at most 3 of 30), and the comparison is not
    vacuous: most local outputs are several tokens long."""
    items = local_result["items"]
    assert len(served_result["items"]) == len(items) == 30
    lengths = [len(tokenizer(i["output"], add_special_tokens=False)["input_ids"]) for i in items]
    differing = _compare(model, tokenizer, local_result, served_result)
    same_predictions = sum(a["prediction"] == b["prediction"]
                           for a, b in zip(items, served_result["items"], strict=True))
    print(f"\n{label}: {30 - len(differing)} of 30 outputs identical, {same_predictions} of 30 predictions; "
          f"local outputs {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / 30:.0f}); accuracy local "
          f"{local_result['summary']['average']:.3f}, server {served_result['summary']['average']:.3f}")
    for item in differing:
        print(json.dumps(item))
    assert sum(n >= 4 for n in lengths) >= 25, lengths
    assert all(item["top2_gap"] < NEAR_TIE for item in differing), differing
    assert len(differing) <= 3, differing


@pytest.mark.parametrize(("task", "data", "limit", "max_new_tokens"), [
    ("gsm8k", SHARED_DATA / "math" / "gsm8k_test.jsonl", 30, 128),
    ("commonsense", None, 5, 32),
])
def test_server_predictions_equal_local_generation(server, local, adapter, commonsense_data, task, data, limit,
                                                   max_new_tokens):
    from milora.adapter.serving import read_served_adapter
    from milora.eval.server import connect
    from milora.models import embedded_model_dir

    data = data or commonsense_data
    tuned, base, tokenizer = local
    served = connect(server.url, adapter=str(adapter), adapter_base=read_served_adapter(adapter).base,
                     local_model=str(embedded_model_dir()), concurrency=8)
    assert served.name == "tuned"  # found by its path, no --served-model needed
    options = {"limit": limit, "max_new_tokens": max_new_tokens, "progress": False}
    served_result = evaluate(served, tokenizer, task, data, **options)
    local_result = evaluate(tuned, tokenizer, task, data, batch_size=8, **options)
    _check_equal(f"{task}, adapter", tuned, tokenizer, local_result, served_result)

    base_name = next(e.id for e in server.models if e.parent is None)
    served_base = evaluate(connect(server.url, served_model=base_name), tokenizer, task, data, **options)
    local_base = evaluate(base, tokenizer, task, data, batch_size=8, **options)
    _check_equal(f"{task}, base", base, tokenizer, local_base, served_base)
    changed = sum(a["output"] != b["output"]
                  for a, b in zip(served_base["items"], served_result["items"], strict=True))
    print(f"{task}: the adapter changed {changed} of 30 outputs of the served base")
    assert changed > 0  # the server applied the adapter


def test_cli_eval_through_the_server_finds_the_adapter_by_its_path(server, adapter, tmp_path, capsys):
    from milora.cli import main

    output = tmp_path / "served.json"
    assert main(["eval", "--task", "gsm8k", "--data", str(SHARED_DATA / "math" / "gsm8k_test.jsonl"), "--limit", "3",
                 "--max-new-tokens", "16", "--adapter", str(adapter), "--server", server.url,
                 "--output", str(output)]) == 0
    summary = json.loads(output.read_text())["summary"]
    assert summary["n"] == 3 and summary["settings"]["served_model"] == "tuned"
    assert summary["adapter"] == str(adapter)
    message = main(["eval", "--task", "gsm8k", "--server", server.url, "--served-model", "nothing"])
    assert message == 2 and "does not serve 'nothing'; it serves" in capsys.readouterr().err


def test_runtime_loaded_adapter_gives_the_started_adapters_outputs(server, local, adapter):
    """`milora compare`'s eval_server path: an adapter loaded into the running server under a new name
    answers as the one the server started with, and is gone after the block."""
    from milora.eval.server import connect, list_models, runtime_adapter

    tokenizer = local[2]
    options = {"limit": 4, "max_new_tokens": 48, "progress": False}
    data = SHARED_DATA / "math" / "gsm8k_test.jsonl"
    with runtime_adapter(server.url, "loaded-at-run-time", str(adapter)) as name:
        assert name in [e.id for e in list_models(server.url)]
        loaded = evaluate(connect(server.url, served_model=name), tokenizer, "gsm8k", data, **options)
    assert name not in [e.id for e in list_models(server.url)]
    started = evaluate(connect(server.url, served_model="tuned"), tokenizer, "gsm8k", data, **options)
    assert [i["output"] for i in loaded["items"]] == [i["output"] for i in started["items"]]
    assert any(i["output"] for i in loaded["items"])
