"""AlpacaEval judges: the `alpaca-eval` package's pairwise annotator, built from the user's choice.

``judge`` names one of:

- an alpaca-eval annotator config: a name under ``alpaca_eval/evaluators_configs`` (e.g.
  ``alpaca_eval_gpt4``, the AlpacaEval 1.0 judge; ``weighted_alpaca_eval_gpt4_turbo``, 2.0) or a
  path to a ``configs.yaml`` (or its directory), used as it is (API judges read their keys from
  the environment, e.g. ``OPENAI_API_KEY``);
- a local Hugging Face model directory: the package's plain "Output (a) / Output (b)" judge config
  (``text_davinci_003``: prompt, regex parser, 50 new tokens; its local ``oasst_pythia_12b`` config
  has the same prompt wrapped in OASST's own special tokens) with that model, greedy, its answer cut
  at the first blank line (`LOCAL_STOP_STRINGS`).
  Its decoder is `local_completions` below rather than the package's ``huggingface_local_completions``,
  which fails on CPU with transformers 5 (it passes ``load_in_8bit=False`` to the model) and
  reloads the model for every chunk; the prompt is rendered with the judge's chat template
  when it has one (ChatML prompts turned into messages, as the package's vLLM decoder does);
- the URL of an OpenAI-compatible server (``http://host:8000/v1``, e.g. a vLLM server you
  started): the package's config for open models behind such an API
  (``alpaca_eval_llama3_70b_fn``: ranking prompt and parser, the package's OpenAI client), with
  ``judge_model`` (default: the server's first model).

Everything else (prompt filling, the seeded random swap of the two outputs, verdict parsing,
win rates) is the package's own. `check_judge` makes one judgement before any answer is
generated, so an unreachable or unloadable judge fails early.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from functools import lru_cache
from pathlib import Path

import yaml

from milora.errors import DataError

LOCAL_BASE_CONFIG = "text_davinci_003"
LOCAL_STOP_STRINGS = ("\n\n",)
"""A local judge's answer ends at its first blank line: the verdict is one line, and small models go on
to write the other option too ("Output (a)\n\nOutput (b)"), which the parser rightly refuses."""
SERVER_BASE_CONFIG = "alpaca_eval_llama3_70b_fn"
PROBE = {"instruction": "What is 2 + 2?", "output_1": "2 + 2 = 4.", "output_2": "It is 5."}


def _alpaca_eval():
    """Import alpaca-eval (which sets the root logger to INFO on import: restored here)."""
    level = logging.getLogger().level
    try:
        with warnings.catch_warnings():  # alpaca-eval 0.6.6 imports the deprecated pkg_resources
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            from alpaca_eval import constants
            from alpaca_eval.annotators import PairwiseAnnotator
    except ImportError as error:
        raise DataError(f"AlpacaEval needs the `alpaca-eval` package ({error}): "
                        "`pip install 'milora[alpaca-eval]'`.") from error
    finally:
        logging.getLogger().setLevel(level)
    return constants, PairwiseAnnotator


def judge_kind(judge: str) -> str:
    """``server``, ``local`` or ``config`` (see the module docstring)."""
    if judge.startswith(("http://", "https://")):
        return "server"
    if (Path(judge) / "config.json").is_file():
        return "local"
    return "config"


def _base_config(constants, name: str) -> dict:
    path = Path(constants.EVALUATORS_CONFIG_DIR) / name / "configs.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))[name]
    config["prompt_template"] = str(Path(constants.EVALUATORS_CONFIG_DIR) / config["prompt_template"])
    return config


def _config_path(constants, judge: str) -> Path:
    for path in (Path(judge), Path(constants.EVALUATORS_CONFIG_DIR) / judge):
        if path.is_dir() and (path / "configs.yaml").is_file():
            return path / "configs.yaml"
        if path.is_file():
            return path
    names = sorted(p.name for p in Path(constants.EVALUATORS_CONFIG_DIR).iterdir() if (p / "configs.yaml").is_file())
    raise DataError(f"judge {judge!r} is neither an alpaca-eval annotator config ({', '.join(names[:6])}, ... "
                    f"{len(names)} in all), a configs.yaml path, a local model directory (with config.json), nor "
                    "an http(s):// URL of an OpenAI-compatible server.")


def _served_model(url: str) -> str:
    import openai

    try:
        models = openai.OpenAI(base_url=url, api_key=_api_key() or "EMPTY", max_retries=0, timeout=30).models.list()
        return models.data[0].id
    except (openai.OpenAIError, IndexError) as error:
        raise DataError(f"judge server {url} could not be reached or lists no model ({type(error).__name__}: {error}); "
                        "start it first (e.g. `vllm serve MODEL`), or name the model with judge_model.") from error


def _api_key() -> str | None:
    import os

    return os.environ.get("OPENAI_API_KEY")


def _write_config(workdir: Path, name: str, config: dict) -> Path:
    path = workdir / name / "configs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({name: config}), encoding="utf-8")
    return path


def build_annotator(judge: str, workdir: Path, *, judge_model: str | None = None, batch_size: int = 8):
    """``(annotator, description)``: a `PairwiseAnnotator` for ``judge``; config files go to ``workdir``."""
    constants, PairwiseAnnotator = _alpaca_eval()
    kind = judge_kind(judge)
    extra = {}
    if judge_model is not None and kind != "server":
        raise DataError("judge_model only applies to a judge server URL; an annotator config or a model directory "
                        "names its own model.")
    if kind == "config":
        path = _config_path(constants, judge)
    elif kind == "local":
        config = _base_config(constants, LOCAL_BASE_CONFIG)
        config.pop("fn_completions")  # replaced by local_completions (see the module docstring)
        config["completions_kwargs"] = {"model_name": str(Path(judge).resolve()), "batch_size": batch_size,
                                        "max_new_tokens": config["completions_kwargs"]["max_tokens"],
                                        "stop_strings": list(LOCAL_STOP_STRINGS)}
        path, extra = _write_config(workdir, "milora_local_judge", config), {"fn_completions": local_completions}
    else:
        config = _base_config(constants, SERVER_BASE_CONFIG)
        client = {"base_url": judge, **({} if _api_key() else {"api_key": "EMPTY"})}  # a set key is read by the client
        (workdir / "clients.yaml").write_text(yaml.safe_dump({"default": [client]}), encoding="utf-8")
        kwargs = config["completions_kwargs"]
        for key in ("client_kwargs", "price_per_token"):
            kwargs.pop(key, None)
        kwargs.update(model_name=judge_model or _served_model(judge), client_config_path=str(workdir / "clients.yaml"))
        path = _write_config(workdir, "milora_server_judge", config)
    level = logging.getLogger().level
    try:
        annotator = PairwiseAnnotator(annotators_config=str(path), caching_path=None, seed=0, **extra)
    except Exception as error:  # a broken config: missing prompt file, unknown parser or decoder, bad yaml
        raise DataError(f"judge {judge!r} could not be set up from {path} "
                        f"({type(error).__name__}: {error}).") from error
    finally:
        logging.getLogger().setLevel(level)
    return annotator, {"judge": judge, "kind": kind, "config": str(path), "judge_model": judge_model}


def check_judge(annotator, judge: str) -> dict:
    """One judgement of a fixed pair, before any answer is generated: the judge is reachable and loads."""
    try:
        record = annotator.annotate_pairs([dict(PROBE)])[0]
    except Exception as error:  # whatever the decoder raises: connection, authentication, model loading
        raise DataError(f"judge {judge!r} could not be reached or loaded ({type(error).__name__}: {error}). "
                        "Check the URL / model path, or the API key in the environment "
                        "(e.g. OPENAI_API_KEY).") from error
    return {"probe_verdict": preference(record), "probe_raw": record.get("preference_raw_completion")}


def preference(record: dict) -> float | None:
    """The package's verdict: 1 the first output (the reference) wins, 2 the second (the model), 1.5 a
    tie, values in between for weighted judges; None when the judge's answer could not be parsed."""
    value = record.get("preference")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def record_completions(annotator) -> list[tuple[str, str]]:
    """Wrap the annotator's decoders so that every ``(prompt, completion)`` is kept: the package drops
    the raw text of verdicts its parser cannot read, and milora reports those too (`raw_completion`)."""
    log: list[tuple[str, str]] = []
    for single in annotator.annotators.values():
        def recording(prompts, _decoder=single.fn_completions, **kwargs):
            output = _decoder(prompts=prompts, **kwargs)
            log.extend(zip(prompts, output["completions"], strict=False))
            return output

        single.fn_completions = recording
    return log


def raw_completion(log: list[tuple[str, str]], *texts: str) -> str | None:
    """The judge's answer to the (last) prompt that holds all ``texts`` (instruction and both outputs)."""
    return next((completion for prompt, completion in reversed(log) if all(t in prompt for t in texts)), None)


# ---------------------------------------------------------------- local judge decoder


@lru_cache(maxsize=1)
def _local_model(path: str):
    from milora.models import load_base_model

    return load_base_model(path)


def _render(tokenizer, prompt: str) -> str:
    """The judge prompt in the judge's chat template when it has one (ChatML prompts as their messages)."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    if prompt.strip().startswith("<|im_start|>"):
        from alpaca_eval.utils import prompt_to_chatml

        messages = prompt_to_chatml(prompt)
    else:
        messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def local_completions(prompts: list[str], model_name: str, max_new_tokens: int = 50, batch_size: int = 8,
                      stop_strings: tuple[str, ...] = ()) -> dict[str, list]:
    """alpaca-eval's decoder interface for a local model: greedy completions of the judge prompts,
    cut at the first stop string."""
    from milora.eval.generation import generate

    model, tokenizer = _local_model(model_name)
    started = time.time()
    completions = generate(model, tokenizer, [_render(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, add_special_tokens=not getattr(tokenizer, "chat_template", None),
                           stop_strings=tuple(stop_strings), progress=False)
    seconds = (time.time() - started) / max(len(prompts), 1)
    return {"completions": completions, "price_per_example": [math.nan] * len(prompts),
            "time_per_example": [seconds] * len(prompts)}
