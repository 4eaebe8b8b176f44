"""Issue 22, round 2, the rest: echoed values cut and alias bombs in overrides, evaluation records checked
before any work, ambiguous AlpacaEval ids, outputs checked up front and I/O errors as messages, the
streaming init's residual adapter."""

from __future__ import annotations

import json
import re

import pytest

from milora.errors import ConfigError, DataError

from conftest import QUESTIONS, cli_error, commonsense_records

LEVELS = ["&a [" + ", ".join(["x"] * 10) + "]"] + [f"&{name} [" + ", ".join([f"*{previous}"] * 10) + "]"
                                                    for previous, name in zip("abcdefgh", "bcdefghi", strict=True)]
BOMB = "[" + ", ".join(LEVELS) + "]"  # 9 levels of 10: a billion values once expanded


def test_an_alias_bomb_in_an_override_is_refused_quickly():
    from milora.training.config import parse_overrides

    with pytest.raises(ConfigError, match="alias bomb") as caught:
        parse_overrides([f"lora_rank={BOMB}"])
    assert len(str(caught.value)) < 500
    assert parse_overrides(["trainer_args={a: &x 1, b: *x}", "lora_rank=8"]) == {"trainer_args": {"a": 1, "b": 1},
                                                                             "lora_rank": 8}


HUGE = "x" * 10**6


@pytest.mark.parametrize("key,value", [("lora_rank", HUGE), ("init", HUGE), ("lora_" + HUGE, 1)],
                         ids=["wrong type", "not a choice", "unknown key"])
def test_a_huge_value_is_not_echoed_whole(tmp_path, key, value):
    from milora.training.config import from_dict

    with pytest.raises(ConfigError) as caught:
        from_dict({"dataset": "d.json", "output_dir": str(tmp_path / "out"), key: value})
    assert len(str(caught.value)) < 1000 and re.search(r"\(100000\d characters\)", str(caught.value))


def test_a_huge_override_is_not_echoed_whole_by_the_cli(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: d.json\noutput_dir: {tmp_path / 'out'}\n")
    message = cli_error(["train", str(config), "lora_rank=" + "9x" * 500_000])
    assert len(message) < 1000 and "1000000 characters" in message
    sweep_message = cli_error(["compare", str(config), "learning_rates=" + "y" * 10**6])
    assert len(sweep_message) < 2000


# ---------------------------------------------------------------- evaluation records checked before any work



@pytest.fixture(scope="module")
def sweep_model(tmp_path_factory):
    from conftest import make_model_dir

    return str(make_model_dir(tmp_path_factory.mktemp("model") / "model"))


def _sweep(tmp_path, model, test, validation=None, train=None) -> dict:
    (tmp_path / "train.json").write_text(json.dumps(train or commonsense_records(QUESTIONS[:60])))
    (tmp_path / "test.json").write_text(json.dumps(test))
    values = {"output_dir": str(tmp_path / "out"), "methods": ["lora"], "learning_rates": [0.01],
              "train": {"model": model, "dataset": str(tmp_path / "train.json"), "max_steps": 1, "report_to": "none"},
              "eval_task": "commonsense", "eval_data": str(tmp_path / "test.json"), "validation_size": 5}
    if validation is not None:
        (tmp_path / "validation.json").write_text(json.dumps(validation))
        values.update(validation_size=None, validation_data=str(tmp_path / "validation.json"))
    return values


BROKEN = [(lambda r: {k: v for k, v in r.items() if k != "answer"}, r"item 7: no `answer` field"),
          (lambda r: {**r, "instruction": None}, r"item 7: `instruction` must be a string, got None"),
          (lambda r: {**r, "answer": True}, r"item 7: `answer` must be a string, got True")]


@pytest.mark.parametrize("edit,message", BROKEN, ids=["no answer", "instruction null", "answer not a string"])
@pytest.mark.parametrize("where", ["test", "validation", "held out"])
def test_a_sweep_refuses_a_broken_evaluation_record_before_any_run(tmp_path, sweep_model, edit, message, where):
    from milora.comparison.sweep import load_sweep

    test, validation, train = commonsense_records(QUESTIONS[60:90]), commonsense_records(QUESTIONS[90:100]), None
    broken = {"test": test, "validation": validation}.get(where)
    if where == "held out":  # validation_size: the held-out training records are scored with eval_task
        train = [edit(record) for record in commonsense_records(QUESTIONS[:60])]
        validation = None
    else:
        broken[7] = edit(broken[7])
    values = _sweep(tmp_path, sweep_model, test, validation, train)
    file = {"test": "test.json", "validation": "validation.json", "held out": "held_out_validation.jsonl"}[where]
    with pytest.raises(DataError, match=rf"{re.escape(file)} {message if where != 'held out' else ''}"):
        load_sweep(values)  # what `milora compare` does first
    assert not (tmp_path / "out").exists()  # refused before anything was written or trained


def test_milora_eval_checks_every_record_before_the_model_loads(tmp_path, monkeypatch):
    import milora.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(milora.models, "load_base_model", no_model)
    records = commonsense_records(QUESTIONS[:30])
    records[12] = {**records[12], "instruction": None}
    (tmp_path / "test.json").write_text(json.dumps(records))
    message = cli_error(["eval", "--task", "commonsense", "--data", str(tmp_path / "test.json"),
                         "--output", str(tmp_path / "r.json")])
    assert f"{tmp_path / 'test.json'} item 12: `instruction` must be a string, got None" in message


# ---------------------------------------------------------------- ambiguous AlpacaEval ids

def _alpaca(tmp_path, instructions, ids):
    reference, answers = tmp_path / "reference.json", tmp_path / "answers.jsonl"
    reference.write_text(json.dumps([{"instruction": text, "output": "ref"} for text in instructions]))
    answers.write_text("".join(json.dumps({"id": name, "output": f"answer {name}"}) + "\n" for name in ids))
    return reference, answers


@pytest.mark.parametrize("instructions,ids,named", [
    (["Say a.", "Say b.", "Say c.", "Say d.", "Say e.", "0"], [0, 1, 2, 3, 4, 5], r"0 \(line 1: items 0, 5\)"),
    (["Say a.", "Say hi.", "Say c.", "Say hi."], ["Say a.", "Say hi.", "Say c.", "Say hi."],
     r"'Say hi\.' \(line 2: items 1, 3\), 'Say hi\.' \(line 4: items 1, 3\)"),
], ids=["an instruction that is another item's index", "an instruction given twice"])
def test_ambiguous_alpaca_eval_ids_are_refused(tmp_path, instructions, ids, named):
    from milora.eval import evaluate

    reference, answers = _alpaca(tmp_path, instructions, ids)
    with pytest.raises(DataError, match=rf"id\(s\) name more than one item of the data: {named}"):
        evaluate(None, None, "alpaca-eval", judge="alpaca_eval_gpt4", reference=str(reference),
                 predictions=str(answers), progress=False)


def test_unambiguous_alpaca_eval_ids_by_index_or_text_still_load(tmp_path):
    from milora.eval.scoring.predictions import load_predictions

    texts = ["Say a.", "Say b.", "7"]
    _, answers = _alpaca(tmp_path, texts, [0, "Say b.", 2])
    aliases = [[str(i), text] for i, text in enumerate(texts)]
    assert load_predictions(answers, aliases, range(3)) == ["answer 0", "answer Say b.", "answer 2"]


# ---------------------------------------------------------------- the FutureWarning of `make demo`

def test_peft_reading_a_deprecated_transformers_property_warns_no_milora_user(tmp_path):
    import warnings

    from peft import LoraConfig

    import milora

    from conftest import LLAMA_TARGETS, tiny_llama

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = milora.get_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS),
                                 progress=False)
        milora.save_adapter(model, tmp_path / "adapter")
        milora.load_model(tiny_llama(), tmp_path / "adapter")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):  # filtered at PEFT's calls only
        assert tiny_llama().is_gradient_checkpointing is False


# ---------------------------------------------------------------- the streaming init's residual adapter

def test_the_streamed_residual_adapter_points_at_residual_model_and_is_refused_on_the_original(tmp_path):
    from transformers import AutoModelForCausalLM

    from milora.adapter.load import open_peft_adapter
    from milora.cli import main

    from conftest import make_model_dir

    make_model_dir(tmp_path / "model")
    assert main(["init", str(tmp_path / "model"), "--output", str(tmp_path / "res"), "--rank", "2",
                 "--save-residual"]) == 0  # a local safetensors directory: the streaming init
    config = json.loads((tmp_path / "res" / "residual_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "res" / "residual_model").resolve())
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    with pytest.raises(Exception, match="paper-layout adapter of the residual model") as caught:
        open_peft_adapter(original, tmp_path / "res" / "residual_adapter")
    assert "AdapterError" in type(caught.value).__name__
    message = cli_error(["eval", "--model", str(tmp_path / "model"), "--adapter",
                         str(tmp_path / "res" / "residual_adapter"), "--task", "forgetting", "--limit", "1",
                         "--output", str(tmp_path / "r.json")])
    assert "paper-layout adapter of the residual model" in message
    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "res" / "residual_model")
    open_peft_adapter(residual, tmp_path / "res" / "residual_adapter")  # its own base: accepted


# ---------------------------------------------------------------- outputs checked up front, I/O errors as messages

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("io") / "model")


def _run(argv):
    """(exit status, stderr) of the command line."""
    import contextlib
    import io

    from milora.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def test_an_output_that_is_a_file_is_refused_by_every_command(tmp_path, model_dir):
    taken = tmp_path / "taken"
    taken.write_text("the user's file")
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {model_dir}\ndataset: {tmp_path / 'd.json'}\noutput_dir: {taken}\n")
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"output_dir: {taken / 'sub'}\nlearning_rates: [0.01]\neval_task: commonsense\n"
                     f"eval_data: {tmp_path / 'test.json'}\nvalidation_data: {tmp_path / 'v.json'}\n"
                     f"train: {{model: {model_dir}, dataset: {tmp_path / 'd.json'}}}\n")
    (tmp_path / "test.json").write_text(json.dumps(commonsense_records(QUESTIONS[:25])))
    (tmp_path / "v.json").write_text(json.dumps(commonsense_records(QUESTIONS[30:35])))
    for argv in (["init", str(model_dir), "--output", str(taken)], ["train", str(config)],
                 ["compare", str(sweep)], ["init", str(model_dir), "--output", str(taken / "adapter")]):
        code, message = _run(argv)
        assert code == 2 and "Traceback" not in message and str(taken) in message, (argv, message)
    assert taken.read_text() == "the user's file"


def test_init_on_a_read_only_directory_stops_before_decomposing(tmp_path, model_dir, monkeypatch):
    import errno

    import milora.init.streaming
    import milora.io

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def decompose(*args, **kwargs):
        raise AssertionError("decomposed before the output was checked")

    monkeypatch.setattr(milora.io.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(milora.init.streaming, "stream_init", decompose)
    message = cli_error(["init", str(model_dir), "--output", str(tmp_path / "out")])
    assert f"{tmp_path / 'out'} cannot be written" in message and "Read-only file system" in message


@pytest.mark.parametrize("failure", ["full disk", "safetensors"])
def test_an_io_error_while_saving_is_a_message_and_leaves_nothing(tmp_path, model_dir, monkeypatch, failure):
    import errno

    import safetensors

    import milora.adapter.save

    def write_safetensors(*args, **kwargs):
        if failure == "full disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(milora.adapter.save, "write_safetensors", write_safetensors)
    argv = ["init", str(model_dir), "--output", str(tmp_path / "out"), "--rank", "2"]
    code, message = _run(argv)
    assert code == 1 and "Traceback" not in message
    assert "milora init: error: cannot read or write a file: " in message and "No space left" in message
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    code, message = _run(["--debug", *argv])
    assert code == 1 and "Traceback" in message
