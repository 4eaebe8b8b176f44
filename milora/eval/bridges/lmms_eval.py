"""The bridge to lmms-eval (LMMs-Lab's harness for vision-language models, what lm-eval is to LLMs):
``lmms-eval:<task,...>`` on the loaded image-text-to-text model, adapter included.

lmms-eval is an optional extra (``pip install 'milora[lmms-eval]'``), kept out of milora's
dependencies because it requires torchvision and pins its own torch and math-verify. The loaded
model is handed to lmms-eval's ``simple_evaluate`` wrapped as an lmms-eval ``lmms`` model
(`_model_class`): its ``generate_until`` renders each request's context after one ``<image>``
placeholder per visual with the processor's chat template and generates greedily
(`milora.eval.generation.generate_with_images`), cut at the request's ``until`` strings. Only
generation tasks run: a task asking for log-likelihoods, sampling or beams is a clear error.
``data`` is an ``include_path`` of local task YAMLs (their ``!function`` entries import that
directory's ``utils.py``: only use directories you trust).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from milora.errors import DataError, DataNotFoundError
from milora.eval.bridges.harness import primary_metric, run_tasks
from milora.eval.generation import generate_with_images
from milora.eval.registry import Job, TaskResult, register
from milora.prompts import apply_chat_template

DEFAULT_MAX_NEW_TOKENS = 128
INSTALL_HINT = "pip install 'milora[lmms-eval]' (it needs torchvision and its own torch: use a separate environment)"


def _import_lmms_eval():
    try:
        from lmms_eval.api.model import lmms
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
    except ImportError as error:
        raise DataError(f"lmms-eval tasks need lmms-eval, which is not installed ({error}): {INSTALL_HINT}.") from error
    return lmms, simple_evaluate, TaskManager


def greedy_settings(gen_kwargs: dict[str, Any], task: str) -> tuple[int, list[str]]:
    """(max_new_tokens, stop strings) of an lmms-eval request; sampling or beam search is refused."""
    sampling = gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0
    if sampling or (gen_kwargs.get("num_beams") or 1) > 1:
        raise DataError(f"lmms-eval task {task} asks for sampling or beam search ({gen_kwargs}); milora's bridge "
                        "decodes greedily only.")
    until = gen_kwargs.get("until") or []
    stops = [until] if isinstance(until, str) else list(until)
    return int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), stops


def _cut(text: str, stops: list[str]) -> str:
    return text[:min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))]


def _model_class():
    """An lmms-eval ``lmms`` model class serving a loaded model and processor (lmms-eval imported lazily)."""
    lmms, _, _ = _import_lmms_eval()

    class MiloraLMM(lmms):
        chat_template = None

        def __init__(self, model, processor, batch_size: int, progress: bool):
            super().__init__()
            self.model, self.processor, self.batch_size, self.progress = model, processor, batch_size, progress

        @property
        def device(self):
            return next(self.model.parameters()).device

        def generate_until(self, requests) -> list[str]:
            prepared = [self._prepare(request.args) for request in requests]
            outputs = [""] * len(prepared)
            for setting in sorted({p[2] for p in prepared}):  # one generation per max_new_tokens
                chosen = [i for i, p in enumerate(prepared) if p[2] == setting]
                texts = generate_with_images(self.model, self.processor, [prepared[i][0] for i in chosen],
                                             [prepared[i][1] for i in chosen], max_new_tokens=setting,
                                             batch_size=self.batch_size, progress=self.progress, desc="lmms-eval")
                for i, text in zip(chosen, texts, strict=True):
                    outputs[i] = _cut(text, prepared[i][3])
            return outputs

        def _prepare(self, args) -> tuple[str, list, int, list[str]]:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args[:6]
            visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
            if any(not hasattr(v, "convert") for v in visuals):
                raise DataError(f"lmms-eval task {task} gives non-image visuals (video?); milora's bridge takes "
                                "images.")
            content = [{"type": "image"} for _ in visuals] + [{"type": "text", "text": context}]
            prompt = apply_chat_template(self.processor, [{"role": "user", "content": content}], True)
            max_new_tokens, stops = greedy_settings(dict(gen_kwargs or {}), task)
            return prompt, visuals, max_new_tokens, stops

        def loglikelihood(self, requests):
            raise DataError("this lmms-eval task scores log-likelihoods; milora's bridge runs generation tasks only.")

        def generate_until_multi_round(self, requests):
            raise DataError("this lmms-eval task is multi-round; milora's bridge runs single-turn generation tasks "
                            "only.")

    return MiloraLMM


def run_lmms_eval(model, processor, tasks: list[str], include_path, *, limit, batch_size, progress=True):
    """lmms-eval's ``simple_evaluate`` on the loaded model: (scores per task, per-sample items, raw results)."""
    if not hasattr(processor, "image_processor"):
        raise DataError(f"lmms-eval tasks need an image-text-to-text model and its processor; "
                        f"{type(model).__name__} is text-only (use lm-eval:<tasks> for language models).")
    if include_path is not None and not Path(include_path).exists():
        raise DataNotFoundError(f"lmms-eval include path {include_path} does not exist.")
    _, simple_evaluate, task_manager = _import_lmms_eval()
    manager = task_manager(include_path=str(include_path) if include_path is not None else None)
    output = run_tasks(simple_evaluate, lambda: _model_class()(model, processor, batch_size, progress), tasks,
                       manager, limit, harness="lmms-eval", list_command="lmms-eval --tasks list")
    scores, items = {}, []
    for task in tasks:
        primary = primary_metric(output["results"].get(task, {}))
        if primary is not None:
            scores[task] = output["results"][task][primary]
        for sample in output.get("samples", {}).get(task, []):
            items.append({"dataset": task, "doc_id": sample.get("doc_id"), "output": sample.get("resps"),
                          "prediction": sample.get("filtered_resps"), "gold": sample.get("target")})
    return scores, items, output["results"]


@register("lmms-eval:", "lmms-eval tasks (comma-separated) on the loaded image-text-to-text model and adapter "
                        "(optional extra)", metric="value")
def _run(job: Job) -> TaskResult:
    names = [name.strip() for name in job.argument.split(",") if name.strip()]
    scores, items, raw = run_lmms_eval(job.model, job.tokenizer, names, job.data, limit=job.limit,
                                       batch_size=job.batch_size, progress=job.progress)
    return TaskResult(scores, items, str(job.data) if job.data is not None else "lmms-eval",
                      {"lmms_eval_results": raw}, None)
