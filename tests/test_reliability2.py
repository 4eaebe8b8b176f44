"""Reliability round 2 (issue 22): bad values and odd inputs end in a clear error, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from milora.errors import DataError
from milora.eval import evaluate


def _jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), float("-inf")])
def test_humaneval_refuses_a_timeout_that_is_not_finite(tmp_path, timeout):
    answers = _jsonl(tmp_path / "a.jsonl", [{"id": "HumanEval/0", "output": "    return False\n"}])
    with pytest.raises(DataError, match="timeout must be a finite number"):
        evaluate(None, None, "humaneval", predictions=str(answers), limit=1, allow_code_execution=True,
                 timeout=timeout, progress=False)


@pytest.mark.parametrize("ks", [(0,), (-1,), (1, 0)])
def test_humaneval_refuses_pass_k_below_one_with_predictions(tmp_path, ks):
    answers = _jsonl(tmp_path / "a.jsonl", [{"id": "HumanEval/0", "output": "    return False\n"}])
    with pytest.raises(DataError, match="pass_k must be positive integers"):
        evaluate(None, None, "humaneval", predictions=str(answers), limit=1, allow_code_execution=True,
                 pass_k=ks, progress=False)


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\u2029", "\x1c"])
def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path, separator):
    from milora.io import read_records
    from milora.training.data import load_records

    records = [{"instruction": f"a{separator}b", "output": "c"}, {"instruction": "d", "output": f"e{separator}f"}]
    path = _jsonl(tmp_path / "data.jsonl", records)
    assert read_records(path) == records
    assert load_records(str(path)) == records


# ---------------------------------------------------------------- saved adapters: corrupt metadata, alpha, dtypes


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from peft import LoraConfig

    import milora

    from conftest import LLAMA_TARGETS, tiny_llama

    directory = tmp_path_factory.mktemp("saved") / "adapter"
    model = milora.get_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS), progress=False)
    milora.save_adapter(model, directory)
    return directory


def _copy(saved, tmp_path):
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "copy"))


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


@pytest.mark.parametrize(("edit", "why"), [
    (lambda m: [], "holds a list"),
    (lambda m: {k: v for k, v in m.items() if k != "init"}, "lacks 'init'"),
    (lambda m: {**m, "fingerprint": "abc"}, "fingerprint must be a mapping"),
    (lambda m: {**m, "r": "2"}, "r must be a positive integer"),
])
def test_a_corrupt_milora_config_is_named(saved_adapter, tmp_path, edit, why):
    from milora.adapter.load import load_model
    from milora.errors import AdapterError

    from conftest import tiny_llama

    adapter = _copy(saved_adapter, tmp_path)
    _edit_json(adapter / "milora_config.json", edit)
    with pytest.raises(AdapterError, match=f"corrupt milora_config.json in .*{why}"):
        load_model(tiny_llama(), adapter)


def test_negated_alpha_in_both_configs_is_refused(saved_adapter, tmp_path):
    from milora.adapter.load import load_model
    from milora.errors import AdapterError

    from conftest import tiny_llama

    adapter = _copy(saved_adapter, tmp_path)
    _edit_json(adapter / "milora_config.json", lambda m: {**m, "lora_alpha": -m["lora_alpha"]})
    _edit_json(adapter / "adapter_config.json", lambda c: {**c, "lora_alpha": -c["lora_alpha"]})
    with pytest.raises(AdapterError, match="lora_alpha must be a positive number"):
        load_model(tiny_llama(), adapter)
    _edit_json(adapter / "milora_config.json", lambda m: {**m, "lora_alpha": -m["lora_alpha"]})
    with pytest.raises(AdapterError, match="lora_alpha must be positive"):
        load_model(tiny_llama(), adapter)


def test_an_integer_adapter_tensor_is_refused_even_with_its_checksum(saved_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    from milora.adapter.format import weights_checksum
    from milora.adapter.load import load_model
    from milora.errors import AdapterError

    from conftest import tiny_llama

    adapter = _copy(saved_adapter, tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first] = (weights[first] * 100).to(torch.int32)
    save_file(weights, adapter / "adapter_model.safetensors")
    _edit_json(adapter / "milora_config.json", lambda m: {**m, "weights_sha256": weights_checksum(weights)})
    with pytest.raises(AdapterError, match=r"has dtype torch\.int32"):
        load_model(tiny_llama(), adapter)


def test_the_residual_adapter_points_at_residual_model_and_is_refused_on_the_original(tmp_path):
    from peft import LoraConfig

    import milora
    from milora.adapter.load import open_peft_adapter
    from milora.errors import AdapterError

    from conftest import LLAMA_TARGETS, tiny_llama

    model = milora.get_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS), progress=False)
    milora.save_adapter(model, tmp_path / "res", save_residual=True)
    config = json.loads((tmp_path / "res" / "residual_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "res" / "residual_model").resolve())
    with pytest.raises(AdapterError, match="paper-layout adapter of the residual model"):
        open_peft_adapter(tiny_llama(), tmp_path / "res" / "residual_adapter")
    from transformers import AutoModelForCausalLM

    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "res" / "residual_model")
    open_peft_adapter(residual, tmp_path / "res" / "residual_adapter")  # its own base: accepted


def test_a_decompression_bomb_image_names_the_record_and_the_limit(tmp_path):
    from PIL import Image

    from milora.images import check_image, load_image

    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 M pixels, a few KB on disk
    for read in (check_image, load_image):
        with pytest.raises(DataError, match=r"record 3: image .*bomb\.png is too large .*limit is \d+ pixels"):
            read(path, 3)


def test_the_demo_cuts_questions_at_a_word_boundary():
    from milora.demos.text import question_tail

    question = "Give the final answer to the following question about apples: 3 + 4 ="
    tail = question_tail(question, 60)
    assert tail.startswith("...") and question.endswith(tail[3:]) and len(tail) <= 63
    assert f" {tail[3:].split()[0]} " in f" {question} "  # a whole word first
    assert question_tail("short one", 60) == "short one"


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    from milora.errors import ConfigError
    from milora.io import read_yaml_mapping

    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[level]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="alias bomb") as caught:
        read_yaml_mapping(path)
    assert len(str(caught.value)) < 500
    fine = tmp_path / "fine.yaml"
    fine.write_text("base: &base {lr: 1.0e-4}\nrun: *base\n")
    assert read_yaml_mapping(fine) == {"base": {"lr": 1.0e-4}, "run": {"lr": 1.0e-4}}


# ---------------------------------------------------------------- the checksum is verified by eval and on resume


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64] ^= 0xFF  # inside the tensor data, not the header
    path.write_bytes(bytes(data))


def test_eval_and_resume_verify_the_checksum(tmp_path, tiny):
    """docs/reliability.md: "load_model, merge, eval, analyze and resuming verify it" (merge, analyze and
    load_model: test_reliability.py): a flipped byte in the weights is refused, and nothing is written."""
    from milora.errors import AdapterError
    from milora.training.run import train

    from conftest import cli_error, run_config

    out = tmp_path / "run"
    train(run_config(tiny, out, max_steps=2, save_steps=2))
    _flip_a_byte(out / "adapter_model.safetensors")
    text = tmp_path / "text.txt"
    text.write_text("The river flows south to the sea. " * 20)
    message = cli_error(["eval", "--model", tiny["model"], "--adapter", str(out), "--task", "forgetting",
                         "--data", str(text), "--output", str(tmp_path / "r.json")])
    assert "does not match the checksum" in message and not (tmp_path / "r.json").exists()

    checkpoint = out / "checkpoint-2"
    _flip_a_byte(checkpoint / "adapter_model.safetensors")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(AdapterError, match=r"checkpoint-2.*does not match the checksum"):
        train(run_config(tiny, out, max_steps=3, save_steps=2, resume_from_checkpoint=True))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # no checkpoint-3, no new adapter


# ---------------------------------------------------------------- the embedded-model cache is written atomically


def test_the_embedded_model_cache_is_staged(tmp_path, monkeypatch):
    """docs/reliability.md: the embedded-model cache is built in a staging directory and renamed into place.
    The GGUF conversion is replaced by a tiny LLaMA (what is under test is the write): interrupted while
    saving, the cache holds nothing (no half model, no staging); the next call writes it whole."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import milora.models

    from conftest import tiny_llama, tiny_tokenizer

    source, tokenizer = tiny_llama(), tiny_tokenizer()
    monkeypatch.setenv("MILORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(milora.models, "embedded_gguf_path", lambda: tmp_path / "smollm2.gguf")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: source)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tokenizer)
    saved_tokenizer = type(tokenizer).save_pretrained

    def interrupted(self, directory, *args, **kwargs):
        assert (Path(directory) / "model.safetensors").is_file()  # the model is already written, into staging
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        milora.models.embedded_model_dir()
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(type(tokenizer), "save_pretrained", saved_tokenizer)
    target = milora.models.embedded_model_dir()
    assert target.parent == tmp_path / "cache" and [p.name for p in (tmp_path / "cache").iterdir()] == [target.name]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}
    monkeypatch.undo()
    cached = AutoModelForCausalLM.from_pretrained(target)
    assert cached.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), source.state_dict().values(),
                                                  strict=True))
