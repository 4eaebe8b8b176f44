"""objective: grpo on TRL's GRPOTrainer from a MiLoRA start: with a constant reward the advantage is 0,
so the first step's loss and gradient are 0 (and with beta > 0 the KL to the reference is 0: the
reference is the original model); the saved adapter reproduces the trained model on the original
base through plain PEFT; resume is exact; bad rewards and records are refused before anything is
written; the built-in math and format rewards grade as math-verify does."""

import json

import pytest
import torch
from test_training import InterruptAt
from transformers import TrainerCallback

from milora.errors import ConfigError, DataError
from milora.training.rewards import format_reward, math_reward
from milora.training.run import train

from conftest import RECORDS, assert_same_adapter, run_config

PROMPTS = [{"prompt": r["instruction"], "answer": r["output"].split(" is ")[1].split(".")[0]} for r in RECORDS]
REWARDS = '''
def constant(completions, **kwargs):
    return [1.0] * len(completions)


def length(completions, **kwargs):
    return [len(c) / 10 for c in completions]
'''


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (root / "rewards.py").write_text(REWARDS)
    return {"dataset": str(root / "prompts.jsonl"), "rewards": str(root / "rewards.py")}


def grpo_config(tiny, prompts, output_dir, reward="length", **extra):
    return run_config({**tiny, "dataset": prompts["dataset"]}, output_dir, **{
        "objective": "grpo", "grpo_rewards": [f"{prompts['rewards']}:{reward}"], "grpo_num_generations": 4,
        "grpo_max_completion_length": 6, "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
        "lora_dropout": 0.0, **extra})


class Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def first(self):
        return next(entry for entry in self.logs if "loss" in entry)


@pytest.mark.parametrize("init", ["milora", "pissa"])
def test_constant_reward_has_zero_advantage_loss_gradient_and_kl_at_step_one(tiny, prompts, tmp_path, init):
    logs = Logs()
    train(grpo_config(tiny, prompts, tmp_path / "out", reward="constant", init=init, grpo_beta=0.1, max_steps=1),
          callbacks=[logs])
    first = logs.first()
    assert first["reward_std"] == 0.0
    assert abs(first["loss"]) < 1e-7 and first["grad_norm"] == 0.0
    assert abs(first["kl"]) < 1e-6  # the reference is the start, i.e. the original model


def test_saved_adapter_reproduces_the_trained_model_on_the_original_base(tiny, prompts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    end = {}

    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                end["logits"] = model(ids).logits

    logs = Logs()
    result = train(grpo_config(tiny, prompts, tmp_path / "out", grpo_beta=0.1, max_steps=3), callbacks=[Keep(), logs])
    assert any(entry.get("grad_norm", 0) > 0 for entry in logs.logs)  # it did train
    out = result.output_dir
    assert not list(out.rglob("*.bin")) and not list(out.rglob("ref")) and not (out / "README.md").exists()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out).eval()
    with torch.no_grad():
        reloaded = plain(ids).logits
    assert ((reloaded - end["logits"]).abs().max() / end["logits"].abs().max()).item() < 1e-5


def test_ctrl_c_checkpoint_and_resume_match_an_uninterrupted_run(tiny, prompts, tmp_path):

    settings = {"max_steps": 4, "grpo_beta": 0.1}
    train(grpo_config(tiny, prompts, tmp_path / "a", **settings))
    stopped = train(grpo_config(tiny, prompts, tmp_path / "b", **settings), callbacks=[InterruptAt(2)])
    assert stopped.interrupted and not (stopped.checkpoint / "ref").exists()
    resumed = train(grpo_config(tiny, prompts, tmp_path / "b", resume_from_checkpoint=True, **settings))
    assert resumed.metrics["global_step"] == 4
    assert_same_adapter(tmp_path / "a", tmp_path / "b")


def test_a_reference_on_the_residual_base_is_refused_on_the_first_batch(tiny, prompts, tmp_path):
    class DropReference(TrainerCallback):  # what TRL does where it cannot add the "ref" adapter
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.delete_adapter("ref")

    with pytest.raises(ConfigError, match="GRPO reference is not the original model"):
        train(grpo_config(tiny, prompts, tmp_path / "out", grpo_beta=0.1), callbacks=[DropReference()])


@pytest.mark.parametrize(("extra", "words"), [
    ({"grpo_rewards": ["nonsense"]}, "unknown reward 'nonsense'"),
    ({"grpo_rewards": ["no_such_module_xyz:f"]}, "cannot import the reward 'no_such_module_xyz:f'"),
    ({"grpo_rewards": ["math", "missing.py:f"]}, "the file missing.py does not exist"),
    ({"grpo_num_generations": 3}, "grpo_num_generations=3 completions per prompt, which must divide"),
    ({"grpo_rewards": None}, "objective: grpo needs grpo_rewards"),
    ({"trainer_args": {"beta": 0.2}}, "trainer_args.beta: milora sets this from dpo_beta or grpo_beta"),
    ({"trainer_args": {"scale_rewardz": "batch"}}, "did you mean 'scale_rewards'"),
])
def test_bad_grpo_settings_are_refused_before_anything_is_written(tiny, prompts, tmp_path, extra, words):
    out = tmp_path / "out"
    config = {key: value for key, value in grpo_config(tiny, prompts, out, **extra).items() if value is not None}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        train(config)
    assert not out.exists()


def test_bad_prompt_records_and_keys_of_another_objective(tiny, prompts, tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"prompt": "Add 1 and 2."}) + "\n")
    with pytest.raises(DataError, match="prompt record 1: missing field\\(s\\) answer"):
        train({**grpo_config(tiny, prompts, out), "dataset": str(bad), "grpo_rewards": ["math"]})
    with pytest.raises(ConfigError, match="grpo_beta belong to objective: grpo"):
        train(run_config(tiny, out, grpo_beta=0.1))
    with pytest.raises(ConfigError, match="objective: grpo needs prompt records"):
        train({**grpo_config(tiny, prompts, out), "dataset": tiny["dataset"]})
    assert not out.exists()


def test_math_and_format_rewards():
    completions = [r"so \boxed{\frac{1}{2}}", "The answer is 0.5.", "The answer is 3", "no answer here"]
    assert math_reward(completions, answer=["0.5"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward(completions) == [1.0, 1.0, 1.0, 0.0]
    chat = [[{"role": "assistant", "content": "The answer is 7"}]]
    assert math_reward(chat, answer=[7]) == [1.0]
