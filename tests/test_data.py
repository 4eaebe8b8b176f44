"""Data loading, formats, templates and prompt masking (tokenizers only, no model)."""

import copy
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from milora.errors import DataError
from milora.prompts import TEMPLATES, render_prompt
from milora.training.config import from_dict
from milora.training.data import (
    IGNORE_INDEX,
    build_datasets,
    detect_format,
    encode_records,
    load_records,
    normalise_record,
    supervised_collator,
)

from conftest import tiny_tokenizer

HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
INPUT_HEAD = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


SHARED_TOKENIZERS = ("smol_tokenizer", "bos_tokenizer")


def tokenizer_state(tokenizer) -> tuple:
    """What a test could change on a shared tokenizer: special tokens, sides, lengths, template, vocabulary."""
    return (tokenizer.special_tokens_map, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side,
            tokenizer.truncation_side, tokenizer.model_max_length, tokenizer.chat_template, len(tokenizer))


@pytest.fixture(autouse=True)
def shared_tokenizers_unchanged(request):
    """The module-scoped tokenizers are shared by every test here: a test that changes one would change
    what the later tests see. A test that needs another setting works on a copy."""
    shared = {name: request.getfixturevalue(name) for name in SHARED_TOKENIZERS if name in request.fixturenames}
    before = {name: tokenizer_state(tokenizer) for name, tokenizer in shared.items()}
    yield
    assert {name: tokenizer_state(tokenizer) for name, tokenizer in shared.items()} == before


@pytest.fixture(scope="module")
def smol_tokenizer():
    """A tiny stand-in with SmolLM2's conventions (ChatML template, EOS <|im_end|>): no model download."""
    return tiny_tokenizer([render_prompt("alpaca", "Add 2 and 3", "numbers") + "hello there see you yo"] * 4)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A small byte-level BPE tokenizer that puts <s> in front of every text, like LLaMA's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [render_prompt("alpaca", "Add 2 and 3", "numbers") + "The answer is 5."] * 4
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                             special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_templates_render_as_documented(smol_tokenizer):
    assert render_prompt("alpaca", "Do X") == HEAD + "### Instruction:\nDo X\n\n### Response:\n"
    assert render_prompt("alpaca", "Do X", "with Y") == (
        INPUT_HEAD + "### Instruction:\nDo X\n\n### Input:\nwith Y\n\n### Response:\n")
    assert render_prompt("metamath", "Solve 1+1") == HEAD + "### Instruction:\nSolve 1+1\n\n### Response:"
    assert render_prompt("metamath", "Solve", "1+1") == HEAD + "### Instruction:\nSolve\n\n1+1\n\n### Response:"
    assert render_prompt("plain", "Do X") == "Do X\n"
    assert render_prompt("plain", "Do X", "with Y") == "Do X\n\nwith Y\n"
    expected_chat = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Do X\n\nwith Y"}], tokenize=False, add_generation_prompt=True
    )
    assert render_prompt("chat", "Do X", "with Y", tokenizer=smol_tokenizer) == expected_chat
    assert expected_chat.endswith("<|im_start|>assistant\n")
    assert set(TEMPLATES) == {"alpaca", "metamath", "plain", "chat"}
    assert all(spec.description for spec in TEMPLATES.values())
    with pytest.raises(DataError, match="unknown template 'alpacca'"):
        render_prompt("alpacca", "x")
    with pytest.raises(DataError, match="pass the tokenizer"):
        render_prompt("chat", "x")


@pytest.mark.parametrize("template", ["alpaca", "metamath", "plain"])
def test_labels_mask_exactly_the_prompt(smol_tokenizer, template):
    items = [{"instruction": "Add 2 and 3", "input": "", "output": "The answer is 5."},
             {"instruction": "Add", "input": "2 3", "output": "5"}]
    examples, stats = encode_records(items, template, smol_tokenizer, cutoff_len=512, progress=False)
    for item, example in zip(items, examples, strict=True):
        prompt_ids = smol_tokenizer(render_prompt(template, item["instruction"], item["input"]),
                                    add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert example["input_ids"][:n] == prompt_ids
        assert example["labels"][:n] == [IGNORE_INDEX] * n
        assert example["labels"][n:] == example["input_ids"][n:]  # every response token and EOS is trained
        assert example["input_ids"][-1] == smol_tokenizer.eos_token_id
        assert smol_tokenizer.decode(example["input_ids"][n:-1]) == item["output"]
    assert stats.examples == 2 and stats.truncated == 0
    assert stats.label_tokens == sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples)


def test_bos_is_part_of_the_masked_prompt(bos_tokenizer):
    (example,), _ = encode_records([{"instruction": "Add 2 and 3", "input": "", "output": "The answer is 5."}],
                                   "alpaca", bos_tokenizer, 512, progress=False)
    n_prompt = 1 + len(bos_tokenizer(render_prompt("alpaca", "Add 2 and 3"), add_special_tokens=False)["input_ids"])
    assert example["input_ids"][0] == bos_tokenizer.bos_token_id
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == bos_tokenizer.eos_token_id


def test_chat_masks_all_but_assistant_turns(smol_tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    (example,), _ = encode_records([{"messages": messages}], "chat", smol_tokenizer, 512, progress=False)
    text = smol_tokenizer.decode(example["input_ids"])
    assert text == smol_tokenizer.apply_chat_template(messages, tokenize=False)
    trained = smol_tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True)
                                     if label != IGNORE_INDEX])
    assert trained == "hello there<|im_end|>\nsee you<|im_end|>\n"
    # instruction records with template chat become one user turn + one assistant turn
    (single,), _ = encode_records([{"instruction": "hi", "input": "", "output": "yo"}], "chat", smol_tokenizer, 512,
                                  progress=False)
    assert smol_tokenizer.decode([t for t, label in zip(single["input_ids"], single["labels"], strict=True)
                                  if label != IGNORE_INDEX]) == "yo<|im_end|>\n"


def test_messages_need_the_chat_template(smol_tokenizer):
    with pytest.raises(DataError, match="set template: chat"):
        encode_records([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
                       "alpaca", smol_tokenizer, 64, progress=False)


def test_overlong_truncate_and_drop(smol_tokenizer):
    items = [{"instruction": "Say", "input": "", "output": "one two three four five six seven eight nine ten"},
             {"instruction": "Say", "input": "", "output": "ok"}]
    prompt_len = len(smol_tokenizer(render_prompt("alpaca", "Say"), add_special_tokens=False)["input_ids"])
    cutoff = prompt_len + 4
    truncated, stats = encode_records(items, "alpaca", smol_tokenizer, cutoff, "truncate", progress=False)
    assert (stats.examples, stats.truncated, stats.dropped_overlong) == (2, 1, 0)
    assert len(truncated[0]["input_ids"]) == cutoff and truncated[0]["input_ids"][-1] != smol_tokenizer.eos_token_id
    assert truncated[1]["input_ids"][-1] == smol_tokenizer.eos_token_id
    kept, stats = encode_records(items, "alpaca", smol_tokenizer, cutoff, "drop", progress=False)
    assert (stats.examples, stats.truncated, stats.dropped_overlong) == (1, 0, 1) and len(kept) == 1
    none, stats = encode_records(items, "alpaca", smol_tokenizer, prompt_len, "truncate", progress=False)
    assert none == [] and stats.dropped_prompt_too_long == 2
    assert "2 dropped because the prompt alone fills cutoff_len" in stats.describe(prompt_len)


def test_collator_pads_with_ignored_labels(smol_tokenizer):
    tokenizer = copy.deepcopy(smol_tokenizer)  # pads with EOS here; the shared one keeps <pad>
    eos = tokenizer.eos_token_id
    batch = [{"input_ids": [5, eos, 7], "labels": [IGNORE_INDEX, eos, 7]}, {"input_ids": [9], "labels": [9]}]
    tokenizer.pad_token = tokenizer.eos_token
    out = supervised_collator(tokenizer)(batch)
    assert out["input_ids"].tolist() == [[5, eos, 7], [9, eos, eos]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, eos, 7], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # from lengths: the EOS inside row 0 is attended
    assert supervised_collator(tokenizer, pad_to_multiple_of=8)(batch)["input_ids"].shape == (2, 8)
    assert smol_tokenizer.pad_token == "<pad>"


RECORDS = [{"instruction": f"Add {a} and {b}", "input": "", "output": f"{a + b}", "answer": str(a + b)}
           for a in range(3) for b in range(4)]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".json-lines", ".parquet"])
def test_local_file_formats(tmp_path, suffix):
    if suffix == ".json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(RECORDS))
    elif suffix == ".parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    else:
        path = tmp_path / ("d.jsonl" if suffix == ".jsonl" else "d.json")  # JSON Lines inside a .json file
        path.write_text("\n".join(json.dumps(record) for record in RECORDS) + "\n\n")
    assert load_records(str(path)) == RECORDS


def test_bad_files(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="has no records"):
        load_records(str(tmp_path / "empty.json"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no records"):
        load_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="JSON list of records"):
        load_records(str(tmp_path / "obj.json"))
    (tmp_path / "scalars.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="record 0 is a int"):
        load_records(str(tmp_path / "scalars.json"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_records(str(tmp_path / "d.csv"))


def test_formats_detected_and_checked():
    assert detect_format({"instruction": "a", "input": "", "output": "b", "answer": "b"}) == "alpaca"
    assert detect_format({"query": "q", "response": "r"}) == "metamath"
    assert detect_format({"messages": []}) == "messages"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format({"question": "q", "answer": "a"})
    assert normalise_record({"query": "q", "response": "r"}, "metamath", 0) == {
        "instruction": "q", "input": "", "output": "r"}
    assert normalise_record({"instruction": "i", "output": "o"}, "llm-adapters", 0) == {
        "instruction": "i", "input": "", "output": "o"}
    with pytest.raises(DataError, match=r"record 3 lacks \['response'\]"):
        normalise_record({"query": "q"}, "metamath", 3)
    with pytest.raises(DataError, match="field 'output' must be a string"):
        normalise_record({"instruction": "i", "output": 5}, "alpaca", 0)
    with pytest.raises(DataError, match="no 'assistant' turn"):
        normalise_record({"messages": [{"role": "user", "content": "hi"}]}, "messages", 0)


def test_build_datasets_split_and_errors(tmp_path, smol_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    config = from_dict({"dataset": str(path), "output_dir": str(tmp_path / "o"), "val_size": 0.25, "max_samples": 8})
    train_set, val_set, stats = build_datasets(config, smol_tokenizer, progress=False)
    assert (len(train_set), len(val_set), stats.records) == (6, 2, 6)
    tiny = from_dict({"dataset": str(path), "output_dir": str(tmp_path / "o"), "cutoff_len": 4, "overlong": "drop"})
    with pytest.raises(DataError, match="no training examples left"):
        build_datasets(tiny, smol_tokenizer, progress=False)
    too_many = from_dict({"dataset": str(path), "output_dir": str(tmp_path / "o"), "val_size": 12})
    with pytest.raises(DataError, match="leaves no training records"):
        build_datasets(too_many, smol_tokenizer, progress=False)


def test_local_dataset_directory_goes_through_datasets(tmp_path):
    """A directory is loaded with `datasets.load_dataset`, the same path as hub names."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    assert load_records(str(tmp_path / "ds")) == RECORDS
    with pytest.raises(DataError,
                       match=r"could not load local dataset directory .*\(split 'validation'\): Unknown split"):
        load_records(str(tmp_path / "ds"), split="validation")


SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"},
    {"from": "human", "value": "bye"}, {"from": "gpt", "value": "see you"},
]}


def test_sharegpt_and_tulu_conversations_train_on_every_assistant_turn(smol_tokenizer):
    assert detect_format(SHAREGPT) == "sharegpt"
    normalised = normalise_record(SHAREGPT, "sharegpt", 0)
    assert [m["role"] for m in normalised["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    tulu = {"id": "x", "source": "y", "messages": normalised["messages"]}  # allenai/tulu-3-sft-mixture's shape
    assert detect_format(tulu) == "messages" and normalise_record(tulu, "messages", 0) == normalised
    (example,), _ = encode_records([normalised], "chat", smol_tokenizer, 512, progress=False)
    trained = smol_tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True)
                                     if label != IGNORE_INDEX])
    assert trained == "hello there<|im_end|>\nsee you<|im_end|>\n"
    with pytest.raises(DataError, match="a ShareGPT turn needs 'from'"):
        normalise_record({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", 0)
    with pytest.raises(DataError, match="no 'assistant' turn"):
        normalise_record({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt", 0)


def test_tulu_chat_template_for_a_tokenizer_without_one(bos_tokenizer):
    import copy

    from tokenizers import decoders

    from milora.prompts import CHAT_TEMPLATES, resolve_chat_template

    tokenizer = copy.deepcopy(bos_tokenizer)
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    assert not getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = resolve_chat_template("tulu")
    messages = normalise_record(SHAREGPT, "sharegpt", 0)["messages"]
    (example,), _ = encode_records([{"messages": messages}], "chat", tokenizer, 512, progress=False)
    assert tokenizer.decode(example["input_ids"]) == (
        "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\nhello there</s>\n"
        "<|user|>\nbye\n<|assistant|>\nsee you</s>")
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True)
                                if label != IGNORE_INDEX])
    assert trained == "hello there</s>see you</s>"  # the newline after a turn belongs to the next prompt
    assert render_prompt("chat", "hi", tokenizer=tokenizer) == "<|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(DataError, match="neither one of tulu nor an existing file"):
        resolve_chat_template("vicuna")
    assert "tulu" in CHAT_TEMPLATES
