"""Batched model calls shared by the evaluation tasks: greedy generation and log-likelihoods."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from milora.errors import DataError
from milora.eval.server import ServerModel
from milora.prompts import truncate_at_stop


@contextmanager
def padding_side(tokenizer, side: str):
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8,
             stop_strings: tuple[str, ...] = (), add_special_tokens: bool = True, progress: bool = True,
             desc: str = "generate", temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None) -> list[str]:
    """Completions of ``prompts`` (batched, left padding, KV cache), cut at the first stop string.

    Greedy when ``temperature`` is 0, else sampled with that temperature and nucleus ``top_p``
    (``seed``: torch's generator is seeded with it first). Prompts are sorted by length so that
    batches hold similar lengths; outputs come back in the prompts' order.
    ``add_special_tokens=False`` for prompts that already hold them (chat templates).
    ``model`` may be a `milora.eval.server.ServerModel`: the same prompts go to the server
    (``batch_size`` is then its ``concurrency``'s business), the same decoding options with them.
    """
    if isinstance(model, ServerModel):
        return model.generate(tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                              add_special_tokens=add_special_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              progress=progress, desc=desc)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": temperature > 0, "temperature": temperature or None, "top_k": None,
                "top_p": top_p if temperature > 0 else None}
    if tokenizer.pad_token_id is None:
        raise DataError("The tokenizer has no pad token: set `tokenizer.pad_token = tokenizer.eos_token`.")
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos = sorted(set(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
    outputs: list[str] = [""] * len(prompts)
    with padding_side(tokenizer, "left"), torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            batch = order[start:start + batch_size]
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]},
                                   return_tensors="pt").to(model_device(model))
            sequences = model.generate(
                **inputs, max_new_tokens=max_new_tokens, num_beams=1, **sampling, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                stop_strings=list(stop_strings) or None, tokenizer=tokenizer if stop_strings else None,
            )
            for index, row in zip(batch, sequences[:, inputs["input_ids"].shape[1]:], strict=False):
                outputs[index] = truncate_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop_strings)
    return outputs


def continuation_logprobs(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 8,
                          progress: bool = True, desc: str = "loglik") -> list[float]:
    """Sum of log-probabilities of each continuation given its context (lm-eval's encoding:
    the continuation's tokens are those of ``context + continuation`` after the context's)."""
    if isinstance(model, ServerModel):
        raise DataError("log-likelihood scoring (--scorer loglik) runs on a local model only, not through "
                        "--server: use --scorer generate with --server, or drop --server.")
    pairs = []
    for context, continuation in requests:
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        if len(whole) <= len(context_ids):
            raise DataError(f"The continuation {continuation!r} adds no tokens to its context.")
        pairs.append((whole, len(whole) - len(context_ids)))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]), reverse=True)
    scores = [0.0] * len(pairs)
    with padding_side(tokenizer, "right"), torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            batch = order[start:start + batch_size]
            inputs = tokenizer.pad({"input_ids": [pairs[i][0] for i in batch]},
                                   return_tensors="pt").to(model_device(model))
            logits = model(**inputs).logits
            for row, index in enumerate(batch):
                ids, count = pairs[index]
                logprobs = logits[row, len(ids) - count - 1:len(ids) - 1].float().log_softmax(-1)
                targets = torch.tensor(ids[-count:], device=logprobs.device)
                scores[index] = logprobs[torch.arange(count, device=logprobs.device), targets].sum().item()
    return scores



def generate_with_images(model, processor, prompts: list[str], images: list[list], *, max_new_tokens: int,
                         batch_size: int = 8, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy completions of chat-rendered ``prompts`` of an image-text-to-text model, batched with left padding.

    ``images[i]``: the images of prompt i (one per image placeholder, in order), as paths opened batch
    by batch (`milora.images.load_image`) or PIL images; the processor expands the placeholders, its
    floating tensors are cast to the model's dtype. Prompts are sorted by length, outputs come back
    in the prompts' order.
    """
    from milora.images import load_image

    tokenizer = processor.tokenizer
    order = sorted(range(len(prompts)), key=lambda i: (len(images[i]), len(prompts[i])), reverse=True)
    dtype = next(model.parameters()).dtype
    outputs: list[str] = [""] * len(prompts)
    with padding_side(tokenizer, "left"), torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            batch = order[start:start + batch_size]
            pictures = [image.convert("RGB") if hasattr(image, "convert") else load_image(image, index)
                        for index in batch for image in images[index]]
            inputs = processor(text=[prompts[i] for i in batch], images=pictures or None, padding=True,
                               add_special_tokens=False, return_tensors="pt").to(model_device(model))
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            sequences = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                top_k=None, pad_token_id=tokenizer.pad_token_id,
            )
            for index, row in zip(batch, sequences[:, inputs["input_ids"].shape[1]:], strict=False):
                outputs[index] = tokenizer.decode(row, skip_special_tokens=True)
    return outputs
