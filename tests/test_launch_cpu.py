"""`milora train` on 2 CPU processes launched the way users launch it (`accelerate launch --config_file` with
the shipped configs): DDP trains, checkpoints, is killed, resumes and ends where one process ends; FSDP and
DeepSpeed configs, which accelerate only applies on GPUs, are refused instead of silently running DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_config

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "recipes" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}


def launch(config: str) -> list[str]:
    """`accelerate launch` with a shipped config, on 2 CPU processes without mixed precision."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
            "--num_processes", "2", "--mixed_precision", "no"]


# rank 0 kills itself (SIGKILL: nothing saved on the way out) as step 4 begins, after checkpoint-2 was written
KILLED_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch.distributed as dist
    from transformers import TrainerCallback
    from milora.training.run import train

    class Kill(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3 and dist.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    train(json.loads(sys.argv[1]), callbacks=[Kill()])
    """
)


@pytest.mark.slow
def test_ddp_by_accelerate_launch_resumes_after_kill_and_matches_one_process(tiny, tmp_path):
    """ddp.yaml, 2 ranks x batch 2, killed at step 3 and resumed from checkpoint-2, against 1 process x batch 4
    (same global batch, dropout off): |diff| <= 1e-5 + 1e-4 |value| (float32 reduction order)."""
    common = {"lora_dropout": 0.0, "max_steps": 4, "save_steps": 2, "init": "milora"}
    single = run_config(tiny, tmp_path / "single", per_device_train_batch_size=4, **common)
    ddp = run_config(tiny, tmp_path / "ddp", per_device_train_batch_size=2, **common)
    subprocess.run([sys.executable, "-m", "milora.cli", "train", _write(tmp_path / "single.yaml", single)],
                   check=True, env=ENV, timeout=600, capture_output=True)
    (tmp_path / "worker.py").write_text(KILLED_WORKER)
    killed = subprocess.run([*launch("ddp.yaml"), str(tmp_path / "worker.py"), json.dumps(ddp)], env=ENV,
                            timeout=600, capture_output=True, text=True)
    assert killed.returncode != 0, killed.stderr[-2000:]
    run_dir = tmp_path / "ddp"
    assert (run_dir / "checkpoint-2" / "milora_config.json").exists() and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "checkpoint-4").exists()
    resumed = subprocess.run([*launch("ddp.yaml"), "-m", "milora.cli", "train", _write(tmp_path / "ddp.yaml", ddp),
                              "resume_from_checkpoint=true"], env=ENV, timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    found = load_file(run_dir / "adapter_model.safetensors")
    expected = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert found.keys() == expected.keys() and len(found) == 20
    for key in found:
        assert torch.allclose(found[key], expected[key], rtol=1e-4, atol=1e-5), (
            key, float((found[key] - expected[key]).abs().max()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4


@pytest.mark.parametrize("name", ["FSDP", "DeepSpeed"])
def test_sharding_on_cpu_processes_is_refused(tiny, tmp_path, name):
    """accelerate drops its FSDP / DeepSpeed plugin on CPU processes (DistributedType.MULTI_CPU): the run would be
    plain DDP, so it is refused, naming the DDP launch, before anything is written. FSDP: the shipped fsdp.yaml;
    DeepSpeed is not installed here (accelerate's DeepSpeed launcher stops before the script), so torchrun with
    the variable that launcher exports."""
    recipe = _write(tmp_path / "run.yaml", run_config(tiny, tmp_path / "out"))
    if name == "FSDP":
        command, env = launch("fsdp.yaml"), ENV
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        env = {**ENV, "ACCELERATE_USE_DEEPSPEED": "true"}
    done = subprocess.run([*command, "-m", "milora.cli", "train", recipe], env=env, timeout=600, capture_output=True,
                          text=True)
    assert done.returncode != 0
    assert f"{name} was asked for on CPU processes" in done.stderr and "ddp.yaml" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def _write(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)
