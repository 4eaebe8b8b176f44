"""Visual instruction data and training on a tiny random LLaVA: formats, loss masks, bad input, a run end to end.

The masks are checked against an independent count: the trained positions decode to exactly the
assistant turns (and their end-of-turn marker), and every image token, system/user turn and
assistant header carries -100.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from tokenizers import decoders

from milora.adapter.load import load_model
from milora.errors import ConfigError, DataError
from milora.models import load_base_model, load_pretrained_model
from milora.training.data import IGNORE_INDEX
from milora.training.run import train
from milora.training.vision_data import check_records, encode_conversation, to_conversation, vision_collator

from conftest import RECORDS, make_llava_dir, make_model_dir, write_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-data")
    model_dir = make_llava_dir(root / "llava")
    names = write_images(root / "images", 4)
    _, processor = load_base_model(str(model_dir))
    return {"root": root, "model": str(model_dir), "images": root / "images", "names": names, "processor": processor}


def llava_record(image="img0.png", turns=(("<image>\nWhat shape is it?", "A circle."),)):
    conversations = []
    for human, gpt in turns:
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return {"id": "r0", "image": image, "conversations": conversations} if image else {"conversations": conversations}


def encode(setup, record, fmt="llava", cutoff_len=512):
    processor = setup["processor"]
    conversation = to_conversation(record, fmt, 0, setup["images"])
    return encode_conversation(conversation, processor, cutoff_len, processor.tokenizer.eos_token_id, 0)


def decode(setup, ids) -> str:
    """The tiny byte-level BPE tokenizer has no decoder of its own."""
    return decoders.ByteLevel().decode(setup["processor"].tokenizer.convert_ids_to_tokens(list(ids)))


def trained_text(setup, example) -> str:
    return decode(setup, [i for i, label in zip(example["input_ids"].tolist(), example["labels"].tolist(), strict=True)
                          if label != IGNORE_INDEX])


def test_llava_record_masks_image_prompt_and_human_turns(setup):
    example = encode(setup, llava_record(turns=(("<image>\nWhat shape is it?", "A circle."),
                                                ("And the colour?", "Red."))))
    image_token = setup["processor"].image_token_id
    ids, labels = example["input_ids"], example["labels"]
    assert int((ids == image_token).sum()) == 16  # (32 / 8)^2 patches, CLS dropped
    assert (labels[ids == image_token] == IGNORE_INDEX).all()
    assert trained_text(setup, example) == "A circle.<|im_end|>\nRed.<|im_end|>\n"  # EOS is <|im_end|>
    assert example["pixel_values"].shape == (1, 3, 32, 32)
    assert decode(setup, ids).startswith("<|im_start|>user\n" + "<image>" * 16 + "\nWhat shape is it?<|im_end|>")
    first_trained = next(i for i, label in enumerate(labels.tolist()) if label != IGNORE_INDEX)
    assert decode(setup, ids[:first_trained]).endswith("<|im_start|>assistant\n")


def test_text_only_llava_record_has_no_image_tensors(setup):
    example = encode(setup, llava_record(image=None, turns=(("Say hi.", "Hi."),)))
    assert "pixel_values" not in example and trained_text(setup, example) == "Hi.<|im_end|>\n"


def test_messages_with_image_entries_and_an_images_list(setup):
    own = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img1.png"},
                                                     {"type": "text", "text": "Shape?"}]},
                        {"role": "assistant", "content": "Square."}]}
    pooled = {"images": ["img1.png"], "messages": [{"role": "user", "content": "<image>Shape?"},
                                                   {"role": "assistant", "content": "Square."}]}
    first, second = encode(setup, own, "messages"), encode(setup, pooled, "messages")
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert trained_text(setup, first) == "Square.<|im_end|>\n"


def test_collator_pads_and_stacks_images(setup):
    examples = [encode(setup, llava_record()), encode(setup, llava_record(image=None, turns=(("Hi", "Yo"),)))]
    batch = vision_collator(setup["processor"])(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    short = len(examples[1]["input_ids"])
    assert batch["attention_mask"][1, short:].eq(0).all() and batch["labels"][1, short:].eq(IGNORE_INDEX).all()
    model = load_pretrained_model(setup["model"])
    assert torch.isfinite(model(**batch).loss)


def test_truncation_never_cuts_image_tokens(setup):
    with pytest.raises(DataError,
                       match=r"record 0 has .* tokens, and truncating it to cutoff_len=10 would cut image tokens"):
        encode(setup, llava_record(), cutoff_len=10)


@pytest.mark.parametrize("record,fmt,message", [
    (llava_record(image="missing.png"), "llava", r"record 3: image .*missing.png does not exist"),
    (llava_record(turns=(("What?", "A."),)), "llava", r"record 3 has 0 <image> placeholder\(s\) but 1 image"),
    (llava_record(turns=(("<image><image>What?", "A."),)), "llava",
     r"record 3 has 2 <image> placeholder\(s\) but 1 image"),
    ({"images": ["img0.png", "img1.png"], "messages": [{"role": "user", "content": "<image>Hi"},
                                                       {"role": "assistant", "content": "Yo"}]},
     "messages", r"record 3: 1 image entries .* but 2 paths in 'images'"),
    ({"conversations": [{"from": "gpt", "value": "A."}]}, "llava", "record 3: needs a user turn first"),
    ({"conversations": [{"from": "robot", "value": "A."}]}, "llava", "record 3: every turn needs 'from'"),
    ({"image": "img0.png", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image>"}]},
     "llava", "record 3: its assistant turn holds an image"),
])
def test_bad_records_name_the_record(setup, record, fmt, message):
    good = llava_record() if fmt == "llava" else {"images": ["img0.png"], "messages": [
        {"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}]}
    records = [good] * 3 + [record]
    with pytest.raises(DataError, match=message):
        check_records(records, fmt, setup["images"], progress=False)


def test_corrupt_and_unsupported_images_name_the_file(setup, tmp_path):
    png = (setup["images"] / "img0.png").read_bytes()
    (tmp_path / "img0.png").write_bytes(png)
    (tmp_path / "corrupt.png").write_bytes(png[:60])
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"record 1: image .*corrupt.png is unreadable or corrupt"):
        check_records([llava_record(), llava_record(image="corrupt.png")], "llava", tmp_path, progress=False)
    with pytest.raises(DataError, match=r"record 0: image .*float.tif has mode 'F'.*save it as RGB"):
        check_records([llava_record(image="float.tif")], "llava", tmp_path, progress=False)


def write_data(setup, name, records):
    path = setup["root"] / name
    path.write_text(json.dumps(records))
    return str(path)


def vision_config(setup, output_dir, dataset, **extra):
    return {"model": setup["model"], "dataset": dataset, "image_folder": str(setup["images"]), "template": "chat",
            "output_dir": str(output_dir), "lora_rank": 4, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
            "max_steps": 3, "logging_steps": 1, "save_steps": 100, "report_to": "none", "seed": 0,
            "modules_to_save": "multi_modal_projector", **extra}


def test_train_on_llava_records_end_to_end(setup, tmp_path):
    records = [llava_record(image=setup["names"][i % 4], turns=((f"<image>\nQuestion {i}?", f"Answer {i % 3}."),))
               for i in range(8)]
    result = train(vision_config(setup, tmp_path / "run", write_data(setup, "train.json", records)))
    assert result.metrics["global_step"] == 3 and result.metrics["data"] == {"records": 8, "images": 4}
    losses = [entry["loss"] for entry in result.metrics["loss_history"] if "loss" in entry]
    assert losses and all(np.isfinite(losses))
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["multi_modal_projector"] and "language_model" in saved["target_modules"]
    example = vision_collator(setup["processor"])([encode(setup, records[0])])
    example.pop("labels")
    reloaded = load_model(load_pretrained_model(setup["model"]), tmp_path / "run")
    plain = PeftModel.from_pretrained(load_pretrained_model(setup["model"]), tmp_path / "run")
    with torch.no_grad():
        a, b, base = (reloaded(**example).logits, plain(**example).logits,
                      load_pretrained_model(setup["model"])(**example).logits)
    assert float((a - b).norm() / a.norm()) < 1e-5 and float((a - base).norm() / base.norm()) > 1e-4


def test_image_data_on_a_text_only_model_is_refused(setup, tmp_path):
    text_model = make_model_dir(tmp_path / "text")
    dataset = write_data(setup, "one.json", [llava_record()])
    with pytest.raises(ConfigError, match=r"holds images, but the model .* is a text-only LlamaForCausalLM"):
        train(vision_config(setup, tmp_path / "run", dataset, model=str(text_model), modules_to_save=None))
    assert not (tmp_path / "run").exists()


def test_targets_missing_from_the_language_model_are_refused(setup, tmp_path):
    dataset = write_data(setup, "one.json", [llava_record()])
    with pytest.raises(ConfigError, match=r"\['fc1'\] not found in the language model"):
        train(vision_config(setup, tmp_path / "run", dataset, lora_target="q_proj,fc1"))
    assert not (tmp_path / "run").exists()


def test_image_records_need_the_chat_template(setup, tmp_path):
    dataset = write_data(setup, "one.json", [llava_record()])
    with pytest.raises(DataError, match="set template: chat"):
        train(vision_config(setup, tmp_path / "run", dataset, template="alpaca"))


def test_text_records_still_train_a_vision_language_model(setup, tmp_path):
    dataset = write_data(setup, "text.json", RECORDS[:8])
    result = train(vision_config(setup, tmp_path / "run", dataset, template="alpaca", max_steps=2))
    assert result.metrics["data"]["examples"] == 8


@pytest.mark.parametrize("init", ["milora", "pissa", "lora"])
def test_llava_recipes_parse_and_build(setup, init, tmp_path):
    import yaml

    from milora.init import get_model
    from milora.training.config import from_dict
    from milora.training.run import build_lora_config

    raw = yaml.safe_load((REPO / "recipes" / "llava.yaml").read_text()) | {"init": init}  # the init= override
    assert (raw["lora_rank"], "lora_alpha" in raw) == (128, False)  # alpha: the key's default, r (2r for lora)
    assert from_dict({**raw, "dataset": __file__, "image_folder": str(setup["images"]),
                      "output_dir": "unused"}).resolved_alpha() == (
        256 if init == "lora" else 128)
    assert (raw["learning_rate"] == 2e-4 and raw["num_train_epochs"] == 1
            and raw["modules_to_save"] == "multi_modal_projector")
    # LLaVA-1.5-7B and its 665K mixture are for GPU machines: check the rest on the tiny stand-in (rank 2)
    config = from_dict({**raw, "model": setup["model"], "dataset": write_data(setup, "recipe.json", [llava_record()]),
                        "image_folder": str(setup["images"]), "output_dir": str(tmp_path / "out"), "lora_rank": 2,
                        "lora_alpha": 2, "dtype": "float32"})
    model = load_pretrained_model(setup["model"])
    peft_model = get_model(model, build_lora_config(config, model), init=config.init, progress=False)
    adapted = milora_layers(peft_model)
    # all-linear, LM only
    assert len(adapted) == 2 * 7 and all(name.startswith("model.language_model.") for name in adapted)


def milora_layers(peft_model):
    from milora.init import lora_layers

    return list(lora_layers(peft_model))


def test_vqa_demo_recipe_matches_the_demo():
    import yaml

    from milora.demos.vqa import vqa_demo_config
    from milora.training.config import from_dict

    where = {"dataset": __file__, "image_folder": str(REPO)}
    recipe = from_dict(yaml.safe_load((REPO / "recipes" / "vqa_demo.yaml").read_text()) | where)
    assert recipe == from_dict(vqa_demo_config("runs/vqa_demo") | where)


def test_vqa_demo_refuses_more_questions_than_easy_vqa_has(tmp_path):
    """An oversize split names the limit, and nothing is written (no output directory)."""
    from milora.demos.vqa import run_vqa_demo

    with pytest.raises(ConfigError, match=r"train_size=100000 exceeds the 38575 questions .* choose at most 38575"):
        run_vqa_demo(tmp_path / "vqa", train_size=100_000)
    with pytest.raises(ConfigError, match="eval_size=20000 exceeds the 9673 questions"):
        run_vqa_demo(tmp_path / "vqa", eval_size=20_000)
    assert not (tmp_path / "vqa").exists()


def test_vqa_demo_data_and_baselines(tmp_path):
    from milora.demos.vqa import answer_type, make_data

    data = make_data(tmp_path, train_size=50, eval_size=20, seed=0)
    train_records = json.loads((tmp_path / "train.json").read_text())
    test_records = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(train_records) == 50 and len(test_records) == 20
    assert train_records[0]["conversations"][0]["value"].startswith("<image>\n")
    conversations = check_records(train_records, "llava", Path(data["image_folder"]), progress=False)
    assert all(len(c.images) == 1 for c in conversations)
    counts = {}
    for record in train_records:
        counts[record["conversations"][1]["value"]] = counts.get(record["conversations"][1]["value"], 0) + 1
    assert data["majority"] == max(counts, key=counts.get)
    assert {answer_type(a, data["shapes"]) for a in data["majority_by_type"].values()} == {"yes/no", "shape", "colour"}
