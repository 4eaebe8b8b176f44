"""The base model's side of the forgetting score, computed once per sweep and read back by every run.

Every run of a sweep scores forgetting as KL(p_base || p_run) on the same text windows, and the
base model's next-token log-probabilities are the same in all of them. The first run to need
them computes them (`milora.eval.tasks.forgetting.base_log_probs`, from its base model before its
adapter is loaded: no second model load) and stores them under the sweep's output directory,

    reference/forgetting-<digest>/batch-<k>.safetensors   float32, one tensor per window
    reference/forgetting-<digest>/reference.json          written last: a directory without it is unused

the later runs read them back window by window. The numbers are those a run would compute itself
(the same model, inputs and batches), so the scores do not change. ``<digest>`` is a SHA-256 of
everything the numbers depend on (`reference_digest`): the token ids of the windows (the text,
tokenizer, ``forgetting_length`` and ``forgetting_windows``), ``eval_batch_size``, the model's
name, dtype, weights (an evenly strided sample of every tensor, `milora.init.targets.fingerprint_sample`)
and, for a local model, its files' names, sizes and modification times, and the torch and
transformers versions. Another digest is another reference: a changed input is never served a
stale one, and references of other digests are deleted when a new one is stored.

A reference larger than `MAX_BYTES` (4 bytes x tokens x vocabulary: 0.4 GB for the embedded
sweep, 8.4 GB for the paper-scale recipes' 64 windows of 1024 tokens) is not stored: each run
then loads a second base model and computes it, as before.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from milora.comparison.job import Job
from milora.eval.tasks.forgetting import ForgettingReference, base_log_probs, forgetting_windows, load_documents
from milora.init.targets import fingerprint_sample
from milora.io import atomic_write_json

MAX_BYTES = 2 * 1024**3
"""The largest reference stored (bytes of float32 log-probabilities); above it each run computes its own."""
MANIFEST = "reference.json"


def reference_root(run_dir: Path) -> Path:
    """``output_dir/reference`` of the sweep whose run directory is ``output_dir/runs/<name>``."""
    return Path(run_dir).parents[1] / "reference"


def reference_digest(model, model_name: str | None, dtype: str, windows: list[list[int]], batch_size: int) -> str:
    """SHA-256 of everything the reference's numbers depend on (module docstring)."""
    import transformers

    digest = hashlib.sha256(json.dumps({"model": model_name, "dtype": dtype, "batch_size": batch_size,
                                        "torch": torch.__version__, "transformers": transformers.__version__,
                                        "files": _file_stats(model_name), "windows": windows}).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(fingerprint_sample(tensor).numpy().tobytes())
    return digest.hexdigest()


def _file_stats(model_name: str | None) -> list | None:
    """Names, sizes and modification times of a local model directory's files (None for a hub name)."""
    if model_name is None or not Path(model_name).is_dir():
        return None
    files = [path for path in sorted(Path(model_name).iterdir()) if path.is_file()]
    return [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def shared_reference(base_model, tokenizer, job: Job) -> ForgettingReference | None:
    """The sweep's stored forgetting reference for ``job`` (read, or computed from ``base_model`` and
    stored); None when it would exceed `MAX_BYTES`. ``base_model`` must hold the original weights."""
    documents, _ = load_documents(job.forgetting_data)
    windows = forgetting_windows(tokenizer, documents, job.forgetting_length, job.forgetting_windows)
    vocabulary = base_model.get_output_embeddings().weight.shape[0]
    if not windows or 4 * vocabulary * sum(len(ids) - 1 for ids in windows) > MAX_BYTES:
        return None  # an empty text is forgetting()'s error to name
    batch_size = job.eval_batch_size
    digest = reference_digest(base_model, job.train.get("model"), job.train.get("dtype", "float32"), windows,
                              batch_size)
    root = reference_root(job.run_dir)
    directory = root / f"forgetting-{digest[:16]}"
    if not _complete(directory, digest):
        _store(directory, digest, base_model, tokenizer, windows, batch_size)
    return ForgettingReference(windows, lambda index: _read(directory, index, batch_size))


def _complete(directory: Path, digest: str) -> bool:
    try:
        return json.loads((directory / MANIFEST).read_text())["digest"] == digest
    except (OSError, json.JSONDecodeError, KeyError):
        return False


def _store(directory: Path, digest: str, base_model, tokenizer, windows: list[list[int]], batch_size: int) -> None:
    """Compute and write the reference into a scratch directory, then move it into place (a run beside this
    one storing the same reference at the same time leaves one of the two); other digests are deleted."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".partial-"))
    try:
        for start, log_probs in base_log_probs(base_model, tokenizer, windows, batch_size):
            save_file({str(start + row): tensor.contiguous() for row, tensor in enumerate(log_probs)},
                      scratch / f"batch-{start // batch_size}.safetensors")
        atomic_write_json(scratch / MANIFEST, {"digest": digest, "windows": len(windows), "batch_size": batch_size})
        if not _complete(directory, digest):  # else a run beside this one stored it meanwhile
            shutil.rmtree(directory, ignore_errors=True)  # an incomplete one left by a killed run
            try:
                scratch.rename(directory)
            except OSError:  # another run moved the same reference into place first
                if not _complete(directory, digest):
                    raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for other in directory.parent.glob("forgetting-*"):
        if other != directory:
            shutil.rmtree(other, ignore_errors=True)


def _read(directory: Path, index: int, batch_size: int) -> torch.Tensor:
    with safe_open(directory / f"batch-{index // batch_size}.safetensors", framework="pt") as file:
        return file.get_tensor(str(index))
