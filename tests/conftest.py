"""Tiny randomly initialised models built from configs, shared by the unit tests."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# Two cores: one BLAS/OpenMP thread per process avoids oversubscription stalls.
torch.set_num_threads(int(os.environ.get("MILORA_TEST_THREADS", "1")))

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(123))


def cli_error(argv: list[str]) -> str:
    """Run the command line expecting a user error: exit status 2; returns what it printed to stderr."""
    import contextlib
    import io

    from milora.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        code = main(argv)
    assert code == 2, f"expected exit status 2, got {code}"
    return buffer.getvalue()
