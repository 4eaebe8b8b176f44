"""The sweep's forgetting reference, computed once and read back: the same scores as a second base model,
reused while its inputs stay, recomputed when any of them changes, never read half-written, and not
stored above its size limit."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch
from test_comparison import setup, sweep_values  # noqa: F401  (setup is a fixture)

from milora.comparison import reference as reference_module
from milora.comparison.reference import MANIFEST, reference_root, shared_reference
from milora.comparison.runner import job_for
from milora.comparison.sweep import load_sweep
from milora.eval.tasks.forgetting import forgetting, load_documents
from milora.models import load_base_model

from conftest import make_model_dir


@pytest.fixture()
def job(setup, tmp_path):  # noqa: F811
    """A run's job on a copy of the sweep's model (the test of changed weights replaces it)."""
    shutil.copytree(setup["model"], tmp_path / "model")
    values = sweep_values(setup, tmp_path / "out", forgetting_windows=3, eval_batch_size=2)
    sweep = load_sweep({**values, "train": {**values["train"], "model": str(tmp_path / "model")}})
    return job_for(sweep, sweep.runs[0])


def moved(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every weight moved a little (a fine-tuned model's stand-in for KL > 0)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    return other


def scores(model, tokenizer, job, **side):
    documents, _ = load_documents(job.forgetting_data)
    return forgetting(model, tokenizer, documents, max_length=job.forgetting_length,
                      limit=job.forgetting_windows, batch_size=job.eval_batch_size, progress=False, **side)


def stored(job) -> list:
    return sorted(path.name for path in reference_root(job.run_dir).glob("forgetting-*"))


def test_stored_reference_gives_the_second_base_models_scores(job, monkeypatch):
    base, tokenizer = load_base_model(job.train["model"])
    model = moved(base)
    expected = scores(model, tokenizer, job, base_model=load_base_model(job.train["model"])[0])
    computed = []
    real = reference_module.base_log_probs
    monkeypatch.setattr(reference_module, "base_log_probs", lambda *a: computed.append(1) or real(*a))
    first = shared_reference(base, tokenizer, job)
    assert scores(model, tokenizer, job, reference=first) == expected  # exactly: the same numbers
    again = shared_reference(base, tokenizer, job)  # a later run reads it back
    assert len(computed) == 1 and scores(model, tokenizer, job, reference=again) == expected
    assert expected[0]["forgetting_loss"] > 0 and len(first.windows) == 3
    # a half-written reference (a run killed while storing it) is computed again, not read
    (directory,) = reference_root(job.run_dir).glob("forgetting-*")
    (directory / MANIFEST).unlink()
    assert scores(model, tokenizer, job, reference=shared_reference(base, tokenizer, job)) == expected
    assert len(computed) == 2


def test_a_changed_input_is_a_new_reference(job, tmp_path):
    base, tokenizer = load_base_model(job.train["model"])
    shared_reference(base, tokenizer, job)
    (first,) = stored(job)
    text = tmp_path / "other.txt"
    text.write_text("A different text about mountains, lakes and the long winter of the north. " * 30)
    changes = [{"forgetting_data": str(text)}, {"forgetting_length": 24}, {"forgetting_windows": 2},
               {"eval_batch_size": 3}, {"train": {**job.train, "dtype": "bfloat16"}}]
    names = {first}
    for change in changes:
        changed = dataclasses.replace(job, **change)
        name_or_path, dtype = changed.train["model"], changed.train.get("dtype", "float32")
        model, changed_tokenizer = load_base_model(name_or_path, dtype=dtype)
        reference = shared_reference(model, changed_tokenizer, changed)
        (name,) = stored(job)  # the other digests' references are deleted
        assert name not in names
        names.add(name)
        other = moved(model)
        assert scores(other, changed_tokenizer, changed, reference=reference) == scores(
            other, changed_tokenizer, changed, base_model=load_base_model(name_or_path, dtype=dtype)[0])
    # the model's weights: a model directory with other weights at the same path
    shutil.rmtree(job.train["model"])
    make_model_dir(job.train["model"], hidden=32)
    model, tokenizer = load_base_model(job.train["model"])
    shared_reference(model, tokenizer, job)
    assert stored(job)[0] not in names


def test_a_reference_over_the_size_limit_is_not_stored(job, monkeypatch):
    base, tokenizer = load_base_model(job.train["model"])
    monkeypatch.setattr(reference_module, "MAX_BYTES", 1000)
    assert shared_reference(base, tokenizer, job) is None and stored(job) == []
