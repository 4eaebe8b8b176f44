"""The transformers `Trainer`, adapted to MiLoRA adapters, and its stop-on-signal callback.

Subclassed in two places because a MiLoRA adapter's rank-r factors are only valid on the
residual base:

- `MiloraTrainer.save_model` writes checkpoints and the final adapter with
  `milora.save_adapter` (a rank-2r LoRA valid on the ORIGINAL base), gathering sharded
  parameters first under DeepSpeed ZeRO-3 / FSDP;
- `MiloraTrainer._load_from_checkpoint` restores the trainable factors with
  `load_trained_state` into the freshly (and deterministically) initialised model; Trainer
  restores the optimizer, scheduler, RNG and data position as usual. Under FSDP the factors are
  restored in `MiloraTrainer.train`, before FSDP shards the model. FSDP's own sharded adapter
  state, which Trainer still writes, is not read: under FSDP1 Trainer's load of it changed
  nothing (peft 0.22's `set_peft_model_state_dict` sees the wrapper's ``_fsdp_wrapped_module.``
  parameter names, strips ``base_model.model.`` from every key and loads none, with
  ``strict=False``), so a resumed run restarted from the initial factors. Resuming under FSDP1
  with sharded checkpoints is refused (`check_fsdp_resumable`).

and for reliability: checkpoints are written to a hidden staging directory and renamed into
place (a kill never leaves a half-written ``checkpoint-N``), and a run resumed at its last step
does not train one step more (see `MiloraTrainer._run_epoch`).

These need four of Trainer's private methods (``PRIVATE_OVERRIDES``), which transformers may
change in any release: `check_trainer_internals` compares their parameters with the ones this
class was written for (transformers 5.24, the range pinned in pyproject.toml) and names the
mismatch, so a changed Trainer fails loudly at construction instead of misbehaving.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from milora.adapter import load_trained_state, save_adapter
from milora.constants import ADAPTER_FILES
from milora.errors import MiloraError

# Trainer's private methods MiloraTrainer overrides -> the parameters it was written against.
PRIVATE_OVERRIDES = {
    "_get_output_dir": ("self", "trial"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_run_epoch": ("self", "model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch",
                   "trial", "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
                   "steps_trained_in_current_epoch"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
}


def check_trainer_internals(trainer_class: type = Trainer) -> None:
    """Raise if a private Trainer method milora overrides is gone or takes other parameters."""
    import transformers

    for name, expected in PRIVATE_OVERRIDES.items():
        method = getattr(trainer_class, name, None)
        found = None if method is None else tuple(inspect.signature(method).parameters)
        if found != expected:
            now = "is gone" if found is None else f"now takes ({', '.join(found)})"
            raise MiloraError(f"transformers {transformers.__version__}: Trainer.{name} {now}, but milora's "
                              f"trainer overrides it as ({', '.join(expected)}); install the tested range "
                              "(pip install 'transformers>=5.24,<5.25') or update milora/training/trainer.py.")


def check_private_method(owner: type, name: str, expected: tuple[str, ...], pin: str) -> None:
    """Raise if ``owner.name`` (a private method milora overrides) is gone or takes other parameters."""
    method = getattr(owner, name, None)
    found = None if method is None else tuple(inspect.signature(method).parameters)
    if found != expected:
        now = "is gone" if found is None else f"now takes ({', '.join(found)})"
        raise MiloraError(f"{owner.__name__}.{name} {now}, but milora overrides it as ({', '.join(expected)}): "
                          f"install {pin}, or update milora/training.")


def write_adapter(peft_model, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """`milora.save_adapter` into ``directory``, which may already hold other files (config, logs).

    The adapter is written complete to a staging directory first, then its files are moved in
    one by one with ``milora_config.json`` last, so a directory that has it has the whole adapter.
    """
    directory = Path(directory)
    if not directory.exists() or not any(directory.iterdir()):
        return save_adapter(peft_model, directory, overwrite=True, state_dict=state_dict)
    staging = directory / ".adapter-staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_adapter(peft_model, staging, state_dict=state_dict)
        for name in ADAPTER_FILES:
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def check_fsdp_resumable(fsdp_plugin, checkpoint: str | os.PathLike) -> None:
    """Refuse to resume under FSDP1 with sharded checkpoints: accelerate (1.16) reads the sharded optimizer
    state into a template made from the new optimizer's state, which is still empty, so it reads nothing
    and Adam's moments would silently restart from zero. FSDP2's loader reads the same checkpoint."""
    import accelerate

    if fsdp_plugin.fsdp_version == 1 and "SHARDED_STATE_DICT" in str(fsdp_plugin.state_dict_type):
        raise MiloraError(
            f"cannot resume {checkpoint} under FSDP1 (fsdp_version: 1, SHARDED_STATE_DICT): accelerate "
            f"{accelerate.__version__} would load none of its optimizer state (Adam's moments would restart from "
            "zero). Resume it under FSDP2, which reads this checkpoint: fsdp_version: 2 as in "
            "recipes/accelerate/fsdp.yaml (or: accelerate launch ... --fsdp_version 2 "
            "--fsdp_reshard_after_forward true)."
        )


class MiloraTrainer(Trainer):
    """`Trainer` whose checkpoints and final output are milora adapters (see module docstring).

    ``_checkpoint_staging`` is set only while `_save_checkpoint` runs: Trainer asks
    `_get_output_dir` where to write ``checkpoint-N``, and gets the staging directory.
    """

    def __init__(self, *args, **kwargs):
        check_trainer_internals()
        super().__init__(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        state_dict = None
        if self.is_fsdp_enabled:  # collective: every rank takes part, rank 0 gets the full state dict
            state_dict = self.accelerator.get_state_dict(self.model)
        elif self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        if self.args.should_save:
            write_adapter(self.accelerator.unwrap_model(self.model), output_dir, state_dict)
        # other ranks write their RNG state into the same checkpoint directory right after this
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        return getattr(self, "_checkpoint_staging", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial) -> None:
        """Trainer's checkpoint (adapter, optimizer, scheduler, RNG, trainer state) written into
        ``.staging-N/checkpoint-N`` and renamed to ``checkpoint-N`` once complete."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".staging-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its RNG state into it
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if (run_dir / name).exists():  # a resumed run saving the step it resumed from again
                shutil.rmtree(run_dir / name)
            os.replace(staging / name, run_dir / name)
            staging.rmdir()
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _run_epoch(self, *args, **kwargs):
        # transformers runs at least one step per epoch, even for a run resumed from a checkpoint
        # at max_steps in the middle of an epoch: it would train step max_steps + 1.
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:  # as Trainer resolves it (and raises when there is none)
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        if self.is_fsdp_enabled and isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_fsdp_resumable(self.accelerator.state.fsdp_plugin, resume_from_checkpoint)
            # Trainer loads an FSDP checkpoint after sharding the model; the whole factors go in before
            load_trained_state(self.model, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:  # already loaded by `train`, into the model before FSDP sharded it
            return
        load_trained_state(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)


class StopOnSignal(TrainerCallback):
    """After Ctrl-C/SIGTERM (``requested``), save a checkpoint at the end of the step and stop.

    Under torch.distributed the request is all-reduced every step, so all ranks stop together.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(requested)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


@contextmanager
def signals_request_stop(callback: StopOnSignal, announce: bool):
    """First Ctrl-C/SIGTERM asks ``callback`` to checkpoint and stop; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if callback.requested:
            for sig, old in previous.items():
                signal.signal(sig, old)
            raise KeyboardInterrupt
        callback.requested = True
        if announce:
            print(
                "\nmilora: interrupt received; saving a checkpoint at the end of this step "
                "(interrupt again to abort without saving).",
                file=sys.stderr,
                flush=True,
            )

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

