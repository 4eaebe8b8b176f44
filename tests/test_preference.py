"""objective: dpo on TRL's DPOTrainer from a MiLoRA/PiSSA start: the reference is the original model
(first-step loss log 2, margin 0), the saved adapter reproduces the trained model on the original
base through plain PEFT (TRL's own save would not), resume is exact, bad input is refused."""

import json
import math

import pytest
import torch
from test_training import InterruptAt
from transformers import TrainerCallback

from milora.errors import ConfigError, DataError
from milora.training.run import train

from conftest import RECORDS, assert_same_adapter, run_config

PAIRS = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": r["output"][::-1] + " no"}
         for r in RECORDS]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return str(path)


def dpo_config(tiny, pairs_file, output_dir, **extra):
    return run_config({**tiny, "dataset": pairs_file}, output_dir, **{
        "objective": "dpo", "max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 5e-3, **extra})


def first_log(result):
    return next(e for e in json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"])


@pytest.mark.parametrize("init", ["milora", "pissa"])
def test_first_dpo_step_is_log2_and_saved_adapter_reproduces(tiny, pairs_file, tmp_path, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    logs, end = [], {}
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs_seen.append(dict(logs or {}))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                end["logits"] = model(ids).logits

    logs_seen = logs
    result = train(dpo_config(tiny, pairs_file, tmp_path / "out", init=init, lora_dropout=0.0), callbacks=[Keep()])
    first = next(entry for entry in logs if entry and "loss" in entry)
    assert abs(first["loss"] - math.log(2)) < 1e-5
    assert abs(first["rewards/margins"]) < 1e-5
    out = result.output_dir
    names = {p.name for p in out.iterdir()}
    assert "training_args.bin" not in names and "ref" not in names and "README.md" not in names
    assert not list(out.rglob("*.bin")) and not list(out.rglob("ref"))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out).eval()
    with torch.no_grad():
        reloaded = plain(ids).logits
    trained = end["logits"]
    assert ((reloaded - trained).abs().max() / trained.abs().max()).item() < 1e-5


def _write(tmp_path, records):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize(("record", "error", "words"), [
    ({"prompt": "a", "chosen": "b"}, DataError, "record 1: missing field(s) rejected"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, DataError, "record 1: chosen equals rejected"),
    ({"prompt": "  ", "chosen": "b", "rejected": "c"}, DataError, "record 1: the prompt is empty"),
    ({"prompt": "word " * 400, "chosen": "b", "rejected": "c"}, DataError, "record 1: its prompt has"),
])
def test_bad_preference_records_are_refused_before_anything_is_written(tiny, tmp_path, record, error, words):
    out = tmp_path / "out"
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        train(dpo_config(tiny, _write(tmp_path, [PAIRS[0], record]), out, cutoff_len=64))
    assert not out.exists()


def test_dpo_without_preference_data_and_keys_of_another_objective(tiny, pairs_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="objective: dpo needs preference data"):
        train(run_config(tiny, out, objective="dpo"))
    with pytest.raises(ConfigError, match="dpo_beta belong to objective: dpo"):
        train(run_config(tiny, out, dpo_beta=0.2))
    assert not out.exists()


def test_ctrl_c_checkpoint_and_resume_match_an_uninterrupted_run(tiny, pairs_file, tmp_path):

    settings = {"max_steps": 4, "lora_dropout": 0.1}
    straight = train(dpo_config(tiny, pairs_file, tmp_path / "a", **settings))
    stopped = train(dpo_config(tiny, pairs_file, tmp_path / "b", **settings), callbacks=[InterruptAt(2)])
    assert stopped.interrupted and stopped.checkpoint.is_dir()
    assert not list(stopped.checkpoint.rglob("*.bin")) and not (stopped.checkpoint / "ref").exists()
    resumed = train(dpo_config(tiny, pairs_file, tmp_path / "b", resume_from_checkpoint=True, **settings))
    assert resumed.metrics["global_step"] == 4
    assert_same_adapter(tmp_path / "a", tmp_path / "b")
    assert [e["loss"] for e in straight.metrics["loss_history"]] == [e["loss"] for e in resumed.metrics["loss_history"]]


def test_trl_own_save_is_wrong_on_the_original_base_and_milora_save_is_right(tiny, pairs_file, tmp_path):
    """Why milora saves itself: TRL's save_model writes the raw rank-r factors (valid only on the residual
    base), a pickled training_args.bin and a ref/ adapter; on the original base they give another model."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from milora.adapter import save_adapter
    from milora.init import get_model

    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    model = get_model(AutoModelForCausalLM.from_pretrained(tiny["model"]),
                      LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                      init="pissa")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3,
                     report_to=[], save_strategy="no", max_length=64, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS[:8]),
                         processing_class=AutoTokenizer.from_pretrained(tiny["model"]))
    trainer.train()
    trainer.save_model(str(tmp_path / "trl"))
    save_adapter(model, tmp_path / "milora")
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits

    def relative_error(directory):
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), directory).eval()
        with torch.no_grad():
            return ((plain(ids).logits - trained).abs().max() / trained.abs().max()).item()

    assert (tmp_path / "trl" / "training_args.bin").exists()  # a pickle milora never writes
    assert relative_error(tmp_path / "trl") > 1e-2
    assert relative_error(tmp_path / "milora") < 1e-5


def test_a_reference_on_the_residual_base_is_refused(tiny, pairs_file, tmp_path):
    """The reference TRL falls back to without its "ref" adapter (disabled adapters) is the residual base:
    refused on the first batch (and a trainer that has neither the adapter nor a ref_model, at construction)."""
    from types import SimpleNamespace

    from milora.training.reference import require_reference_adapter

    class DropReference(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.delete_adapter("ref")

    with pytest.raises(ConfigError, match="DPO reference is not the original model"):
        train(dpo_config(tiny, pairs_file, tmp_path / "out", lora_dropout=0.0), callbacks=[DropReference()])
    without = SimpleNamespace(model=SimpleNamespace(peft_config={"default": None}), ref_model=None,
                              accelerator=SimpleNamespace(unwrap_model=lambda model: model))
    with pytest.raises(ConfigError, match="did not add a frozen 'ref' adapter"):
        require_reference_adapter(without, "DPO")
