"""`milora train` sharded on 2 CPU processes (gloo), launched the way users launch it (`accelerate launch
--config_file recipes/accelerate/...`): under FSDP2 (fsdp.yaml) and DeepSpeed ZeRO-3 (deepspeed_zero3.yaml) it
trains, checkpoints, is killed, resumes and ends where one process ends; FSDP1 trains to the same adapter, and
resuming its sharded checkpoint is refused.

**accelerate's CPU refusal is lifted by these tests, not by milora.** accelerate 1.16 applies an FSDP or DeepSpeed
config only on accelerators: on CPU processes `AcceleratorState` stays ``MULTI_CPU`` and drops the plugin it was
given, so the run would silently be plain DDP, and `milora train` refuses FSDP and DeepSpeed on CPU processes for
that reason (tests/test_launch_cpu.py). torch's FSDP and DeepSpeed (its CPU accelerator) run on CPU over gloo. To
execute milora's sharded code paths (the full adapter gathered for each checkpoint, the sharded state saved beside
it, the resume) the launched worker, ``SHARDED_WORKER`` below, changes three things, in the worker only:

- `AcceleratorState` keeps the FSDP or DeepSpeed plugin accelerate built from the launch config, as it does on a
  GPU; for FSDP with the device ``cpu`` (accelerate's CPU device is ``cpu:0``, which FSDP1 refuses:
  "Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0");
- milora's refusal (`_check_sharding_on_cpu`) is turned off;
- FSDP1 only: `Accelerator.get_state_dict` gathers the full state dict without ``offload_to_cpu``. accelerate asks
  for it, and on CPU shards torch then frees storage the gathered tensors still use: rank 0 dies of SIGSEGV
  (reproduced with torch alone; Lightning-AI/pytorch-lightning#21804).

Everything else is the product: accelerate's launchers and plugins, transformers' Trainer, milora's trainer,
torch's FullyShardedDataParallel (FSDP1) and ``fully_shard`` (FSDP2), DeepSpeed's ZeRO-3 engine. The launch adds
``--mixed_precision no`` (as for DDP on CPU); FSDP1 adds the flags that turn the shipped FSDP2 config into FSDP1,
with ``--fsdp_sync_module_states false``, which accelerate refuses on CPU (every rank builds the same start).
DeepSpeed is not a milora dependency; `make test` installs it, so the ZeRO-3 test runs there (and fails under CI=true
without it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_launch_cpu import ENV, _write, launch

from conftest import needs_package, run_config

# What every launched rank runs: the shim (see the module docstring), a callback that records what FSDP or ZeRO-3
# made of the model on this rank, and with a third argument "kill", rank 0 SIGKILLs itself as step 3 begins
# (nothing saved on the way out; checkpoint-2 was written).
SHARDED_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from transformers import TrainerCallback
    import milora.training.run as run

    accelerator_state_init = AcceleratorState.__init__

    def keep_sharding_on_cpu(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            self.device = torch.device("cpu")
        elif deepspeed_plugin is not None:  # what AcceleratorState does for DeepSpeed on a GPU
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin

    accelerator_get_state_dict = Accelerator.get_state_dict

    def gather_without_offload(self, model, unwrap=True):
        if self.distributed_type != DistributedType.FSDP or self.is_fsdp2:
            return accelerator_get_state_dict(self, model, unwrap)
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            return model.state_dict()

    AcceleratorState.__init__ = keep_sharding_on_cpu
    Accelerator.get_state_dict = gather_without_offload
    run._check_sharding_on_cpu = lambda: None

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
            parameters = list(model.parameters())
            zero3 = all(hasattr(p, "ds_tensor") for p in parameters)  # ZeRO-3's partitioned parameters
            if zero3:
                local, whole = sum(p.ds_tensor.numel() for p in parameters), sum(p.ds_numel for p in parameters)
            else:  # FSDP2's DTensors count their whole size, FSDP1's views their shard
                local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in parameters)
                whole = sum(p.numel() for p in parameters)
            if isinstance(model, FullyShardedDataParallel):
                with FullyShardedDataParallel.summon_full_params(model):
                    whole = sum(p.numel() for p in model.parameters())
            record = {"fsdp1": isinstance(model, FullyShardedDataParallel), "fsdp2": isinstance(model, FSDPModule),
                      "zero3": zero3, "local": local, "whole": whole, "backend": dist.get_backend(),
                      "world": dist.get_world_size()}
            path = os.path.join(sys.argv[2], f"rank{dist.get_rank()}-step{state.global_step}.json")
            with open(path, "w") as file:
                json.dump(record, file)

        def on_step_begin(self, args, state, control, **kwargs):
            if sys.argv[3:] == ["kill"] and state.global_step == 3 and dist.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    run.train(json.loads(sys.argv[1]), callbacks=[Record()])
    # a script's own exit: without it DeepSpeed's ranks at times abort at exit over gloo ("terminate called
    # without an active exception") after the run has finished and saved
    PartialState().destroy_process_group()
    """
)
COMMON = {"lora_dropout": 0.0, "max_steps": 4, "save_steps": 2, "init": "milora"}
# the shipped FSDP2 config as FSDP1, as accelerate's launcher takes it (--fsdp_version alone keeps FSDP2's
# reshard_after_forward: true, which FSDP1 refuses)
FSDP1 = ["--fsdp_version", "1", "--fsdp_reshard_after_forward", "FULL_SHARD", "--fsdp_use_orig_params", "true",
         "--fsdp_sync_module_states", "false"]


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory) -> Path:
    """One process x batch 4, the same 4 steps: where every sharded run must end."""
    folder = tmp_path_factory.mktemp("single")
    config = run_config(tiny, folder / "run", per_device_train_batch_size=4, **COMMON)
    subprocess.run([sys.executable, "-m", "milora.cli", "train", _write(folder / "run.yaml", config)], check=True,
                   env=ENV, timeout=600, capture_output=True)
    return folder / "run"


def run_worker(tmp_path: Path, config: dict, *flags: str, launch_config: str = "fsdp.yaml",
               kill: bool = False) -> subprocess.CompletedProcess:
    """``SHARDED_WORKER`` on 2 CPU processes: `accelerate launch` with a shipped config (and ``flags``)."""
    worker, records = tmp_path / "worker.py", tmp_path / "records"
    worker.write_text(SHARDED_WORKER)
    records.mkdir(exist_ok=True)
    return subprocess.run([*launch(launch_config), *flags, str(worker), json.dumps(config), str(records),
                           *(["kill"] if kill else [])], env={**ENV, "DS_ACCELERATOR": "cpu"}, timeout=600,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_fsdp2_resumes_after_kill_and_matches_one_process(tiny, single, tmp_path):
    """fsdp.yaml as shipped (FSDP2, SHARDED_STATE_DICT), 2 ranks x batch 2, killed at step 3 and resumed from
    checkpoint-2, against 1 process x batch 4 (same global batch, dropout off): |diff| <= 1e-5 + 1e-4 |value|
    (float32 reduction order), as for DDP."""
    config = run_config(tiny, tmp_path / "fsdp", per_device_train_batch_size=2, **COMMON)
    killed = run_worker(tmp_path, config, kill=True)
    assert killed.returncode != 0, killed.stderr[-4000:]
    run_dir = tmp_path / "fsdp"
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "milora_config.json").exists(), killed.stderr[-4000:]
    assert (checkpoint / "optimizer_0").is_dir()  # FSDP's sharded optimizer state, one file per rank
    assert not (run_dir / "checkpoint-4").exists() and not (run_dir / "metrics.json").exists()
    resumed = run_worker(tmp_path, {**config, "resume_from_checkpoint": True})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for step in (0, 2):  # the first run and the resumed one
        assert_sharded(tmp_path / "records", step, "fsdp2")
    assert_same_training(run_dir, single)


@pytest.mark.slow
@needs_package("deepspeed")
def test_zero3_resumes_after_kill_and_matches_one_process(tiny, single, tmp_path):
    """deepspeed_zero3.yaml as shipped (parameters partitioned; zero3_save_16bit_model gathers the adapter), the same
    kill at step 3 and resume from checkpoint-2, the same tolerance. DeepSpeed runs on its CPU accelerator, whose
    communication falls back to gloo without Intel's oneCCL bindings."""
    config = run_config(tiny, tmp_path / "zero3", per_device_train_batch_size=2, **COMMON)
    killed = run_worker(tmp_path, config, launch_config="deepspeed_zero3.yaml", kill=True)
    assert killed.returncode != 0, killed.stderr[-4000:]
    run_dir = tmp_path / "zero3"
    checkpoint = run_dir / "checkpoint-2"
    assert (checkpoint / "milora_config.json").exists(), killed.stderr[-4000:]
    assert (checkpoint / "global_step2").is_dir()  # DeepSpeed's partitioned model and optimizer state
    assert not (run_dir / "checkpoint-4").exists() and not (run_dir / "metrics.json").exists()
    resumed = run_worker(tmp_path, {**config, "resume_from_checkpoint": True}, launch_config="deepspeed_zero3.yaml")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for step in (0, 2):
        assert_sharded(tmp_path / "records", step, "zero3")
    assert_same_training(run_dir, single)


@pytest.mark.slow
def test_fsdp1_matches_one_process_and_refuses_to_resume(tiny, single, tmp_path):
    """FSDP1 (FULL_SHARD, use_orig_params, SHARDED_STATE_DICT) trains the same 4 steps to the same adapter (same
    tolerance); resuming its checkpoint-2 is refused, as accelerate would restore no optimizer state."""
    config = run_config(tiny, tmp_path / "fsdp", per_device_train_batch_size=2, **COMMON)
    done = run_worker(tmp_path, config, *FSDP1)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_sharded(tmp_path / "records", 0, "fsdp1")
    run_dir = tmp_path / "fsdp"
    assert_same_training(run_dir, single)
    adapter = (run_dir / "adapter_model.safetensors").read_bytes()
    refused = run_worker(tmp_path, {**config, "resume_from_checkpoint": str(run_dir / "checkpoint-2")}, *FSDP1)
    assert refused.returncode != 0
    assert "under FSDP1" in refused.stderr and "fsdp_version: 2" in refused.stderr, refused.stderr[-4000:]
    assert (run_dir / "adapter_model.safetensors").read_bytes() == adapter


@pytest.mark.parametrize(("version", "state_dict_type", "refused"), [
    (1, "SHARDED_STATE_DICT", True), (2, "SHARDED_STATE_DICT", False), (1, "FULL_STATE_DICT", False)])
def test_only_fsdp1_sharded_checkpoints_are_refused_for_resuming(version, state_dict_type, refused):
    """The check behind the FSDP1 refusal, on accelerate's own plugin (FSDP1 FULL_STATE_DICT: not run, not refused)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from milora.errors import MiloraError
    from milora.training.trainer import check_fsdp_resumable

    plugin = FullyShardedDataParallelPlugin(fsdp_version=version, state_dict_type=state_dict_type)
    if refused:
        with pytest.raises(MiloraError, match=r"under FSDP1 .* Resume it under FSDP2"):
            check_fsdp_resumable(plugin, "out/checkpoint-2")
    else:
        check_fsdp_resumable(plugin, "out/checkpoint-2")


def assert_sharded(records: Path, step: int, wrapper: str) -> None:
    """Both ranks ran ``wrapper`` (fsdp1, fsdp2 or zero3) over gloo, each holding about half the model's parameters."""
    ranks = [json.loads((records / f"rank{rank}-step{step}.json").read_text()) for rank in (0, 1)]
    assert all(r["backend"] == "gloo" and r["world"] == 2 and r[wrapper] for r in ranks), ranks
    assert all(r["local"] < r["whole"] for r in ranks) and sum(r["local"] for r in ranks) == ranks[0]["whole"], ranks


def assert_same_training(run_dir: Path, single: Path) -> None:
    """The adapter equals the single process's; the init decomposed each weight whole, not its shard (the same
    shapes and selected singular values in the saved report); 4 steps on 2 processes."""
    found = load_file(run_dir / "adapter_model.safetensors")
    expected = load_file(single / "adapter_model.safetensors")
    assert found.keys() == expected.keys() and len(found) == 20
    for key in found:
        assert torch.allclose(found[key], expected[key], rtol=1e-4, atol=1e-5), (
            key, float((found[key] - expected[key]).abs().max()))
    report = json.loads((run_dir / "milora_config.json").read_text())["report"]
    single_report = json.loads((single / "milora_config.json").read_text())["report"]
    assert len(report) == 10 and [e["shape"] for e in report] == [e["shape"] for e in single_report]
    for entry, one in zip(report, single_report, strict=True):
        assert entry["sigma_min_selected"] == pytest.approx(one["sigma_min_selected"], rel=1e-6)
        assert entry["sigma_max_selected"] == pytest.approx(one["sigma_max_selected"], rel=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
