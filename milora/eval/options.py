"""Every evaluation option, declared once: its type and checks, its default (per task where it differs),
its help and its command-line flag, and which tasks take it.

Torch-free on purpose: `milora eval --help` builds its flags from `OPTIONS` and `TASK_OPTIONS`, the
registry (`milora.eval.registry`) checks a task's options against them and fills in the defaults the
task modules then read, and the docs' option table (docs/hooks.py) is rendered from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from milora.errors import DataError, shown
from milora.prompts import TEMPLATE_NAMES

SCORERS = ("generate", "loglik")
"""Commonsense scoring: the generated label (the paper's protocol) or the log-likelihood of each label option."""
MISSING_PUNKT = ("error", "skip")
"""IFEval without NLTK's punkt_tab data: stop, or skip the prompts that need it."""
SAMPLING_TEMPERATURE = 0.8  # HumanEval with samples > 1 and no temperature (Codex paper: 0.8 for pass@100)
SAMPLING_TOP_P = 0.95  # HumanEval's nucleus when sampling and no top_p is given


@dataclass(frozen=True)
class Option:
    """One task option.

    ``default``: the value a task gets when the option is not given (a dict: per task name; ``None``: not
    set, the task decides as ``help`` says). ``kind``: the type a value must have (``float`` accepts integers
    too; ``None``: any value). ``generation``: the option only applies when milora generates the answers,
    so it is refused together with a predictions file. ``cli``: whether `milora eval` has a flag for it."""

    name: str
    help: str
    default: Any = None
    kind: type | tuple[type, ...] | None = None
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    generation: bool = False
    cli: bool = True
    metavar: str | None = None

    @property
    def flag(self) -> str | None:
        return "--" + self.name.replace("_", "-") if self.cli else None

    def default_for(self, task: str) -> Any:
        return self.default.get(task) if isinstance(self.default, dict) else self.default

    def check(self, task: str, value: Any) -> None:
        """A bad ``value`` for ``task`` is a `DataError` naming the option and what it takes (``None``: not given)."""
        if value is None:
            return
        numeric = self.kind in (int, float)
        wrong_type = ((numeric and (isinstance(value, bool)
                                    or not isinstance(value, int if self.kind is int else (int, float))))
                      or (not numeric and self.kind is not None and not isinstance(value, self.kind)))
        not_finite = numeric and not wrong_type and not math.isfinite(value)  # nan passes `<`, inf overflows
        if wrong_type or not_finite or (self.minimum is not None and value < self.minimum):
            what = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
                    (tuple, list): "a list"}.get(self.kind, str(self.kind))
            bound = f" of at least {self.minimum}" if self.minimum is not None else ""
            raise DataError(f"{self.name} must be {what}{bound} (got {shown(value)}) for task {task}.")
        if self.choices is not None and value not in self.choices:
            raise DataError(f"Unknown {self.name} {shown(value)} for task {task}: "
                            f"choose one of {', '.join(self.choices)}.")


_VISION = ("vqa", "pope", "mcq-image")

_DECLARED = (
    Option("scorer", "scoring: the generated label (the paper's protocol) or the log-likelihood of "
           "each label option (faster)", "generate", choices=SCORERS),
    Option("max_new_tokens", "tokens generated per answer",
           {"gsm8k": 512, "math": 512, "commonsense": 32, "ifeval": 1280, "alpaca-eval": 2048, "humaneval": 512,
            "vqa": 16, "pope": 8, "mcq-image": 8}, int, minimum=1, generation=True, metavar="N"),
    Option("max_length", "window of text in tokens", 1024, int, minimum=2, metavar="N"),
    Option("base_model", "forgetting: the loaded original base of a merged model (CLI: --base-model loads it)",
           cli=False),
    Option("base_reference", "forgetting: the base model's side computed once and stored (a ForgettingReference, "
           "e.g. a sweep's, `milora.comparison.reference`), instead of base_model", cli=False),
    Option("image_folder", "folder the records' image paths are relative to (default: the data file's folder)",
           metavar="DIR"),
    Option("predictions", 'score answers made elsewhere: one {"id": ..., "output": ...} per line (ids: IFEval key, '
           "HumanEval task_id, AlpacaEval index or instruction; gsm8k, math, commonsense, vqa, pope, mcq-image: "
           "<dataset>/<index>, the `id` of a results file's items); no model is loaded", kind=str, metavar="JSONL"),
    Option("template", "prompt template (default: chat if the tokenizer has one, else alpaca)",
           choices=TEMPLATE_NAMES, generation=True),
    Option("missing_punkt", "without NLTK's punkt_tab data: stop, or skip the prompts that need it", "error",
           choices=MISSING_PUNKT),
    Option("judge", "an alpaca-eval annotator config (alpaca_eval_gpt4 = AlpacaEval 1.0), a local model directory, "
           "or an OpenAI-compatible server URL (http://host:8000/v1)", kind=str),
    Option("judge_model", "model name on the judge server (default: its first)", kind=str, metavar="NAME"),
    Option("reference", "instructions with reference answers (JSON/JSONL instruction, output); default the hub's "
           "AlpacaEval 1.0 set (text-davinci-003 answers)", kind=str, metavar="FILE"),
    Option("allow_code_execution", "run the model's code (own process, limits; not a container, see "
           "docs/evaluation-sandbox.md)", False, bool),
    Option("samples", "completions per problem", 1, int, minimum=1, generation=True, metavar="N"),
    Option("temperature", f"sampling temperature (default 0 = greedy for 1 sample, {SAMPLING_TEMPERATURE} for more)",
           kind=float, minimum=0, generation=True, metavar="T"),
    Option("top_p", f"nucleus sampling (default {SAMPLING_TOP_P} when sampling, else 1)", kind=float, minimum=0,
           generation=True, metavar="P"),
    Option("pass_k", "the k of pass@k, comma-separated on the command line (default 1; 1,10,100 up to samples)",
           kind=(tuple, list), metavar="K,..."),
    Option("seed", "sampling seed", 0, int, minimum=0, generation=True, metavar="N"),
    Option("timeout", "seconds per program, wall and CPU", 10.0, float, minimum=1, metavar="S"),
)
OPTIONS: dict[str, Option] = {option.name: option for option in _DECLARED}  # names unique: test_eval_options

TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gsm8k", "math"), ("max_new_tokens", "predictions")),
    "commonsense": ("max_new_tokens", "predictions", "scorer"),
    "forgetting": ("base_model", "base_reference", "max_length"),
    "ifeval": ("predictions", "template", "max_new_tokens", "missing_punkt"),
    "alpaca-eval": ("judge", "judge_model", "reference", "predictions", "template", "max_new_tokens"),
    "humaneval": ("allow_code_execution", "predictions", "samples", "temperature", "top_p", "pass_k",
                  "max_new_tokens", "seed", "timeout"),
    **dict.fromkeys(_VISION, ("max_new_tokens", "image_folder", "predictions")),
    "lm-eval:": (),
    "lmms-eval:": (),
}
"""Each task's options (beyond ``data``, ``limit`` and ``batch_size``), by name in `OPTIONS`; a task
registered in `milora.eval.registry` must be listed here (a family name ends in ``:``)."""


def tasks_taking(name: str) -> list[str]:
    """The tasks that take option ``name``, in `TASK_OPTIONS` order."""
    return [task for task, names in TASK_OPTIONS.items() if name in names]


def describe_default(option: Option) -> str:
    """The default as the help and the docs state it: ``""`` when not set, else e.g. ``512 for gsm8k, math; 32 for
    commonsense``."""
    if not isinstance(option.default, dict):
        return "" if option.default is None else str(option.default)
    by_value: dict[Any, list[str]] = {}
    for task, value in option.default.items():
        by_value.setdefault(value, []).append(task)
    return "; ".join(f"{value} for {', '.join(tasks)}" for value, tasks in by_value.items())


def task_names() -> list[str]:
    """The task names as `milora eval --task` takes them (a family as ``lm-eval:<task,...>``)."""
    return [f"{task}<task,...>" if task.endswith(":") else task for task in TASK_OPTIONS]
