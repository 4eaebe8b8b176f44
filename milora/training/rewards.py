"""Reward functions of ``objective: grpo``, named in ``grpo_rewards``.

Built in (each returns one float per completion, as TRL's `GRPOTrainer` calls reward functions:
``f(prompts=, completions=, completion_ids=, **record_columns)``):

- ``math``: 1.0 when the completion's final answer (its last ``\\boxed{}``, else the text after
  the last "The answer is") equals the record's ``answer`` as math-verify judges it
  (`milora.answers`, the same comparison as MATH grading), else 0.0; records need ``answer``.
- ``format``: 1.0 when the completion states a final answer in that form at all, else 0.0.

Any other name is ``module:function`` (an importable module) or ``path/to/file.py:function``;
it is imported before anything is written, and a name that does not resolve to a callable is
a `ConfigError` naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from milora.answers import extract_math_answer, math_answers_equivalent
from milora.errors import ConfigError


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes a string, or a list of messages for chat prompts."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def math_reward(completions: list, answer: list, **kwargs: Any) -> list[float]:
    """1.0 for a completion whose final answer math-verify finds equal to the record's ``answer``."""
    return [float(math_answers_equivalent(extract_math_answer(completion_text(c)), str(gold)))
            for c, gold in zip(completions, answer, strict=True)]


def format_reward(completions: list, **kwargs: Any) -> list[float]:
    """1.0 for a completion that states a final answer (``\\boxed{}`` or "The answer is ...")."""
    return [float(extract_math_answer(completion_text(c)) is not None) for c in completions]


BUILT_IN: dict[str, Callable[..., list[float]]] = {"math": math_reward, "format": format_reward}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {"math": ("answer",)}
"""Record fields a built-in reward reads (checked on every record before training)."""


def _module(location: str, name: str):
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise ConfigError(f"grpo_rewards: {name!r}: the file {path} does not exist.")
        spec = importlib.util.spec_from_file_location(f"milora_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(location)


def resolve_reward(name: str) -> Callable[..., list[float]]:
    """The reward function a ``grpo_rewards`` entry names (see the module docstring)."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    location, sep, attribute = name.rpartition(":")
    if not sep or not location or not attribute:
        raise ConfigError(f"grpo_rewards: unknown reward {name!r}: use a built-in one ({', '.join(BUILT_IN)}) or "
                          "name a Python function as module:function or path/to/file.py:function.")
    try:
        function = getattr(_module(location, name), attribute)
    except (ImportError, AttributeError, SyntaxError) as error:
        raise ConfigError(f"grpo_rewards: cannot import the reward {name!r}: "
                          f"{type(error).__name__}: {error}") from error
    if not callable(function):
        raise ConfigError(f"grpo_rewards: {name!r} is a {type(function).__name__}, not a function.")
    return function
