"""Training end to end: outputs, Ctrl-C + resume, 2-process DDP, recipes, CLI, and a real SmolLM2 run.

Most tests use a tiny random LLaMA (hidden 64, 2 layers) with a small BPE tokenizer, both built
here and saved to a directory like any hub model.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from milora import cli
from milora.adapter.load import load_model
from milora.errors import DataError, MiloraError
from milora.init import get_model
from milora.models import load_base_model
from milora.training.config import ConfigError, from_dict
from milora.training.run import build_lora_config, train

from conftest import RECORDS, assert_same_adapter, cli_error, make_model_dir, run_config

REPO = Path(__file__).resolve().parents[1]


class Capture(TrainerCallback):
    """Keeps the trained (unwrapped) model at the end of training."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


class InterruptAt(TrainerCallback):
    """Sends this process SIGINT (Ctrl-C) as a given step (1-based) begins."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_output_dir_holds_adapter_config_metrics(tiny, tmp_path):
    capture = Capture()
    result = train(run_config(tiny, tmp_path / "out", save_steps=3, report_to="tensorboard", val_size=6),
                   callbacks=[capture])
    out = tmp_path / "out"
    assert result.adapter_dir == out and not result.interrupted
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "milora_config.json", "train_config.yaml",
            "metrics.json"} <= names
    assert {"checkpoint-3", "checkpoint-6", "runs"} <= names and not any(name.startswith(".") for name in names)
    assert any((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard loss log
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["lora_alpha"] == 4.0 and saved["init"] == "milora"  # resolved, not null
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["data"]["examples"] == len(RECORDS) - 6
    assert any("eval_loss" in entry for entry in metrics["loss_history"])
    # the saved adapter reproduces the trained model on the ORIGINAL base (float32: 1e-5)
    probe = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = capture.model.eval()(probe).logits
        base, _ = load_base_model(tiny["model"])
        reloaded = load_model(base, out)(probe).logits
    assert torch.allclose(reloaded, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learning_rate", [0.0, 1e-2])
def test_the_adapter_moves_with_the_learning_rate(tiny, tmp_path, learning_rate):
    """The saved [A; A0] and [B | -B0]: with lr 0 the trainable part is its start, bit for bit; with
    lr 1e-2 every factor of every layer moved (a trainer ignoring the learning rate fails one case)."""
    with pytest.warns(UserWarning) if learning_rate == 0 else contextlib.nullcontext():
        train(run_config(tiny, tmp_path / "out", learning_rate=learning_rate, lora_dropout=0.0))
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for key, value in weights.items():
        trainable, start = (value[:4], value[4:]) if key.endswith("lora_A.weight") else (value[:, :4], -value[:, 4:])
        moved = float((trainable - start).abs().max())
        assert (moved == 0) if learning_rate == 0 else (moved > 1e-3), (key, moved)


def test_ctrl_c_checkpoints_and_resume_matches_uninterrupted(tiny, tmp_path):
    straight = train(run_config(tiny, tmp_path / "a", lora_dropout=0.1))
    stopped = train(run_config(tiny, tmp_path / "b", lora_dropout=0.1), callbacks=[InterruptAt(3)])
    assert stopped.interrupted and stopped.adapter_dir is None
    assert stopped.checkpoint == tmp_path / "b" / "checkpoint-3" and stopped.checkpoint.is_dir()
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
    resumed = train(run_config(tiny, tmp_path / "b", lora_dropout=0.1, resume_from_checkpoint=True))
    assert resumed.metrics["global_step"] == 6
    assert_same_adapter(tmp_path / "a", tmp_path / "b")
    assert [e["loss"] for e in straight.metrics["loss_history"]] == [e["loss"] for e in resumed.metrics["loss_history"]]


class SignalAt(TrainerCallback):
    """Sends this process ``signals`` (one after the other) as a given step (1-based) begins."""

    def __init__(self, step, *signals):
        self.step, self.signals = step, signals

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            for sig in self.signals:
                os.kill(os.getpid(), sig)


def test_sigterm_checkpoints_like_ctrl_c_and_a_second_signal_aborts(tiny, tmp_path):
    """docs/training.md: "Ctrl-C (or SIGTERM) saves a checkpoint before exiting; a second Ctrl-C aborts at once"."""
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    stopped = train(run_config(tiny, tmp_path / "term"), callbacks=[SignalAt(2, signal.SIGTERM)])
    assert stopped.interrupted and stopped.checkpoint == tmp_path / "term" / "checkpoint-2"
    assert (stopped.checkpoint / "milora_config.json").is_file()
    with pytest.raises(KeyboardInterrupt):
        train(run_config(tiny, tmp_path / "twice"), callbacks=[SignalAt(2, signal.SIGINT, signal.SIGINT)])
    assert not list((tmp_path / "twice").glob("checkpoint-*"))  # aborted: nothing saved
    assert not (tmp_path / "twice" / "adapter_model.safetensors").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored


def test_bad_input_writes_nothing(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no records"):
        train(run_config(tiny, tmp_path / "o1", dataset=str(empty)))
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        train(run_config(tiny, tmp_path / "o2"), ["max_step=3"])
    with pytest.raises(ConfigError, match="has no checkpoint"):
        train(run_config(tiny, tmp_path / "o3", resume_from_checkpoint=True))
    assert list(tmp_path.iterdir()) == [empty]
    existing = tmp_path / "o4"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        train(run_config(tiny, existing))
    with pytest.raises(ConfigError, match="not a milora training directory"):
        train(run_config(tiny, existing, overwrite_output_dir=True))
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="cannot build the adapter"):
        train(run_config(tiny, tmp_path / "o5", lora_target="nonexistent_proj"))
    with pytest.raises(ConfigError, match="cannot load model"):
        train(run_config(tiny, tmp_path / "o6", model=str(tmp_path / "no-model")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "o4"]


def test_cli_train(tiny, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny, tmp_path / "out", max_steps=2)))
    assert cli.main(["train", str(config), "init=pissa", "lora_rank=2"]) == 0
    assert json.loads((tmp_path / "out" / "milora_config.json").read_text())["init"] == "pissa"
    # rank 2 saved as rank 4; vLLM's smallest --max-lora-rank holding it is 8
    assert f"--lora-modules out={(tmp_path / 'out').resolve()} --max-lora-rank 8" in capsys.readouterr().out
    assert cli.main(["train", str(config), "lora_rnak=2"]) == 2
    assert "did you mean 'lora_rank'" in capsys.readouterr().err
    assert cli.main(["train", "--list-keys"]) == 0
    assert "per_device_train_batch_size" in capsys.readouterr().out


DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    from milora.training.run import train

    class Dump(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            rank = dist.get_rank() if dist.is_initialized() else 0
            params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(params, os.path.join(sys.argv[2], f"rank{rank}.safetensors"))

    train(json.loads(sys.argv[1]), callbacks=[Dump()])
    """
)


def test_ddp_two_cpu_processes_match_one(tiny, tmp_path):
    """gloo DDP, 2 ranks x batch 2 vs 1 process x batch 4 (same global batch, dropout off).

    Both ranks must hold bitwise-identical adapters, equal to the single-process run within
    float32 reduction-order noise: |diff| <= 1e-5 + 1e-4 |value|.
    """
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    common = {"lora_dropout": 0.0, "max_steps": 4, "save_steps": 2, "init": "milora"}
    single_cfg = run_config(tiny, tmp_path / "single", per_device_train_batch_size=4, **common)
    ddp_cfg = run_config(tiny, tmp_path / "ddp", per_device_train_batch_size=2, **common)
    (tmp_path / "dumps_single").mkdir()
    (tmp_path / "dumps_ddp").mkdir()
    subprocess.run([sys.executable, str(worker), json.dumps(single_cfg), str(tmp_path / "dumps_single")],
                   check=True, env=env, timeout=300)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*launch, str(worker), json.dumps(ddp_cfg), str(tmp_path / "dumps_ddp")],
                   check=True, env=env, timeout=300)
    rank0 = load_file(tmp_path / "dumps_ddp" / "rank0.safetensors")
    rank1 = load_file(tmp_path / "dumps_ddp" / "rank1.safetensors")
    single = load_file(tmp_path / "dumps_single" / "rank0.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys() and len(rank0) == 20
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.allclose(rank0[key], single[key], rtol=1e-4, atol=1e-5), (
            key, (rank0[key] - single[key]).abs().max())
    assert (tmp_path / "ddp" / "checkpoint-2" / "rng_state_1.pth").exists()  # every rank checkpointed its RNG
    saved_ddp = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    saved_single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    for key in saved_ddp:
        assert torch.allclose(saved_ddp[key], saved_single[key], rtol=1e-4, atol=1e-5), key


RECIPE_TASKS = {"commonsense": 32, "math": 64, "instruction": 32}


@pytest.mark.parametrize("task", sorted(RECIPE_TASKS))
@pytest.mark.parametrize("init", ["milora", "pissa", "lora"])
def test_paper_recipes_parse_and_build(task, init, tmp_path_factory):
    raw = yaml.safe_load((REPO / "recipes" / f"{task}.yaml").read_text()) | {"init": init}  # the init= override
    r = RECIPE_TASKS[task]
    assert (raw["lora_rank"], "lora_alpha" in raw) == (r, False)  # alpha: the key's default, the paper's
    assert raw["learning_rate"] == 3e-4 and raw["warmup_steps"] == 100 and raw["num_train_epochs"] == 3
    assert raw["per_device_train_batch_size"] * raw["gradient_accumulation_steps"] == 16
    assert raw["lora_dropout"] == 0.05 and raw["lora_target"] == "q_proj,k_proj,v_proj,up_proj,down_proj"
    if task == "instruction":  # a public conversation mixture, in the Tulu chat format (LLaMA-2 has no template)
        assert (raw["dataset"], raw["template"], raw["chat_template"]) == (
            "allenai/tulu-v2-sft-mixture", "chat", "tulu")
    # the real model and data are for GPU machines: check the rest of the recipe on a tiny stand-in
    root = tmp_path_factory.mktemp("standin")
    data = root / "data.json"
    data.write_text(json.dumps(RECORDS[:4]))
    config = from_dict({**raw, "dataset": str(data), "output_dir": str(root / "out"), "dataset_split": "train"})
    model, _ = load_base_model(str(make_model_dir(root / "model", hidden=160, intermediate=320, layers=1, kv_heads=4)))
    peft_model = get_model(model, build_lora_config(config), init=config.init, progress=False)
    assert (peft_model.peft_config["default"].r == r
            and peft_model.peft_config["default"].lora_alpha == (2 * r if init == "lora" else r))
    assert len(peft_model.milora_init.initial_factors) == (0 if init == "lora" else 5)


def test_launch_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {}
    for path in sorted((REPO / "recipes" / "accelerate").glob("*.yaml")):
        kinds[path.stem] = ClusterConfig.from_yaml_file(path).distributed_type.value
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}
    stages = {p.stem: json.loads(p.read_text())["zero_optimization"]["stage"]
              for p in (REPO / "recipes" / "deepspeed").glob("*.json")}
    assert stages == {"zero2": 2, "zero3": 3}


def test_demo_recipe_matches_the_demo():
    from milora.demos.text import demo_train_config

    recipe = from_dict(yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text()) | {"dataset": __file__})
    embedded = from_dict(demo_train_config("runs/demo") | {"dataset": __file__})
    assert recipe == embedded


def test_demo_task_sizes_are_honoured_and_disjoint(tmp_path):
    """The demo's data: exactly train_size records and eval_size held-out items, no question in
    both, even where the problem space (200 one-digit sums) makes draws repeat; a split the space
    cannot supply is refused with the fix."""
    from milora.demos.text import DEFAULT_TASK, DEFAULT_TASK_OPTIONS, make_task, run_demo

    train, held_out = make_task(DEFAULT_TASK, DEFAULT_TASK_OPTIONS, 400, 100, seed=0)
    questions = [record["messages"][0]["content"] for record in train]
    assert (len(train), len(held_out)) == (400, 100)
    assert not set(questions) & {entry["question"] for entry in held_out}
    # the stream was extended, not deduplicated or reseeded: the records are the leading draws of
    # seed 0 whose question is not held out, in order (the 500 draws of the old pool among them)
    import reasoning_gym

    stream = reasoning_gym.create_dataset(DEFAULT_TASK, size=2000, seed=0, **DEFAULT_TASK_OPTIONS)
    held = {entry["question"] for entry in held_out}
    assert questions == [entry["question"] for entry in stream if entry["question"] not in held][:400]
    with pytest.raises(ConfigError, match="problem space is too small for this split; lower eval_size"):
        make_task(DEFAULT_TASK, DEFAULT_TASK_OPTIONS, 10, 5000, seed=0)
    with pytest.raises(ConfigError, match="problem space is too small"):  # the same through the demo:
        run_demo(tmp_path / "demo", eval_size=5000)
    assert not (tmp_path / "demo").exists()  # refused before anything is written


def test_demo_rejects_bad_sizes_before_any_work(tmp_path):
    for flag, value, name in (("--steps", "0", "max_steps"), ("--eval-size", "-1", "eval_size")):
        assert re.search(f"{name} must be a positive integer, got {value}",
                         cli_error(["demo", "--output", str(tmp_path / "demo"), flag, value]))
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_smollm2_short_run_loss_decreases(tmp_path):
    """The embedded SmolLM2-135M, 8 steps on 8 short chat examples: the training loss goes down."""
    data = tmp_path / "chat.jsonl"
    pairs = [("Capital of France?", "Paris."), ("2 + 2 =", "4"), ("Opposite of hot?", "Cold."),
             ("Color of grass?", "Green.")] * 2
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in pairs
    ))
    result = train(
        {
            "dataset": str(data), "template": "chat", "output_dir": str(tmp_path / "out"), "lora_rank": 8,
            "lora_dropout": 0.0, "learning_rate": 2e-3, "max_steps": 8, "per_device_train_batch_size": 4,
            "cutoff_len": 64, "logging_steps": 1, "report_to": "none", "save_steps": 100,
        }
    )
    losses = [entry["loss"] for entry in result.metrics["loss_history"]]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses


def test_trainer_internals_match_the_installed_transformers():
    """MiloraTrainer overrides private Trainer methods: a changed signature fails loudly, naming it."""
    from transformers import Trainer

    from milora.training.trainer import PRIVATE_OVERRIDES, MiloraTrainer, check_trainer_internals

    check_trainer_internals()
    assert all(name in vars(MiloraTrainer) for name in PRIVATE_OVERRIDES)

    class ChangedTrainer(Trainer):
        def _save_checkpoint(self, model, trial, metrics=None):
            pass

    with pytest.raises(MiloraError, match=r"Trainer._save_checkpoint now takes \(self, model, trial, metrics\)"):
        check_trainer_internals(ChangedTrainer)
