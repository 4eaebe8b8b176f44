"""The transformers `Trainer`, adapted to MiLoRA adapters, and its stop-on-signal callback.

Subclassed in two places because a MiLoRA adapter's rank-r factors are only valid on the
residual base:

- `MiloraTrainer.save_model` writes checkpoints and the final adapter with
  `milora.save_adapter` (a rank-2r LoRA valid on the ORIGINAL base), gathering sharded
  parameters first under DeepSpeed ZeRO-3 / FSDP;
- `MiloraTrainer._load_from_checkpoint` restores the trainable factors with
  `load_trained_state` into the freshly (and deterministically) initialised model; Trainer
  restores the optimizer, scheduler, RNG and data position as usual.
"""

from __future__ import annotations

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

from milora.constants import ADAPTER_FILES
from milora.persistence import load_trained_state, save_adapter


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


class MiloraTrainer(Trainer):
    """`Trainer` whose checkpoints and final output are milora adapters (see module docstring)."""

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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:  # FSDP resumes from its own sharded model state, saved beside the adapter
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
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

