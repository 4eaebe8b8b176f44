"""Init split across 2 CPU processes (gloo): each rank decomposes half the weights, and every rank ends
with the single-process adapters, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import milora

from conftest import LLAMA_TARGETS, tiny_llama


def adapter_state(model) -> dict[str, torch.Tensor]:
    """LoRA factors and residual base weights, by name."""
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters()
            if "lora_" in name or "base_layer" in name}


def _worker(rank: int, world: int, init_file: str, out_dir: str, init: str) -> None:
    torch.set_num_threads(1)
    from milora.init import initialize

    decomposed = []
    select = initialize.select_components_many

    def counting(tasks, *args, **kwargs):  # counts the weights this rank decomposes itself
        return select((decomposed.append(task[0].shape) or task for task in tasks), *args, **kwargs)

    initialize.select_components_many = counting
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
        model = milora.get_model(tiny_llama(), config, init=init, progress=False)
        save_file(adapter_state(model), f"{out_dir}/rank{rank}.safetensors")
        (Path(out_dir) / f"rank{rank}.count").write_text(str(len(decomposed)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("init", ["milora", "random"])
def test_two_process_init_matches_single_process(tmp_path, init):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), init), nprocs=2, join=True)
    single = adapter_state(milora.get_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS),
                                            init=init, progress=False))
    n_layers = sum("lora_A" in name for name in single)
    counts = [int((tmp_path / f"rank{rank}.count").read_text()) for rank in range(2)]
    assert counts == [n_layers // 2, n_layers - n_layers // 2] and n_layers >= 2  # the work is split
    for rank in range(2):
        state = load_file(tmp_path / f"rank{rank}.safetensors")
        assert state.keys() == single.keys()
        for name, tensor in single.items():
            assert torch.equal(state[name], tensor), (rank, name)
