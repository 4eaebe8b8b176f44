"""`milora train` under FSDP on 2 CPU processes (gloo), launched with `accelerate launch --config_file`:
train, checkpoint, SIGKILL, resume; the final adapter equals the single-process run's."""

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
CONFIG = REPO / "recipes" / "accelerate" / "fsdp_cpu.yaml"

# rank 0 kills itself (SIGKILL: no checkpoint on the way out) at step 3, after checkpoint-2 was written
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
def test_fsdp_two_cpu_processes_resume_after_kill_and_match_one(tiny, tmp_path):
    """FSDP FULL_SHARD, 2 ranks x batch 2, killed at step 3 and resumed from checkpoint-2, against 1 process x
    batch 4 (same global batch, dropout off): |diff| <= 1e-5 + 1e-4 |value| (float32 reduction order)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    common = {"lora_dropout": 0.0, "max_steps": 4, "save_steps": 2, "init": "milora"}
    single = run_config(tiny, tmp_path / "single", per_device_train_batch_size=4, **common)
    sharded = run_config(tiny, tmp_path / "fsdp", per_device_train_batch_size=2, **common)
    subprocess.run([sys.executable, "-m", "milora.cli", "train", _write(tmp_path / "single.yaml", single)],
                   check=True, env=env, timeout=600)
    (tmp_path / "worker.py").write_text(KILLED_WORKER)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG)]
    killed = subprocess.run([*launch, str(tmp_path / "worker.py"), json.dumps(sharded)], env=env, timeout=600,
                            capture_output=True, text=True)
    assert killed.returncode != 0, killed.stderr[-2000:]
    run_dir = tmp_path / "fsdp"
    assert (run_dir / "checkpoint-2" / "milora_config.json").exists() and not (run_dir / "metrics.json").exists()
    resumed = subprocess.run([*launch, "-m", "milora.cli", "train", _write(tmp_path / "fsdp.yaml", sharded),
                              "resume_from_checkpoint=true"], env=env, timeout=600, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    found, expected = load_file(run_dir / "adapter_model.safetensors"), load_file(tmp_path / "single" /
                                                                                 "adapter_model.safetensors")
    assert found.keys() == expected.keys() and len(found) == 20
    for key in found:
        assert torch.allclose(found[key], expected[key], rtol=1e-4, atol=1e-5), (
            key, float((found[key] - expected[key]).abs().max()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def _write(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)
