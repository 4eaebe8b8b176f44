"""mkdocs hook: the configuration references, rendered at build time from the declarations.

`<!-- train-config-keys -->` becomes a table of every `TrainConfig` key (name, type, default,
description, as `milora train --list-keys` prints them); `<!-- sweep-config-keys -->` the same
for `SweepConfig` (`milora compare --list-keys`); `<!-- eval-options -->` the evaluation tasks' options
(`milora.eval.options`, as `milora eval --help` lists them); `<!-- api-reference -->`
the API reference of every public name in `milora/__init__.py`. Nothing is written by hand, so it cannot go stale.
"""

from __future__ import annotations

import re
from typing import Any


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _train_table() -> str:
    from milora.training.config import key_help

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, text in key_help():
        rows.append(f"| `{key}` | {_cell(kind)} | `{_cell(repr(default))}` | {_cell(text)} |")
    return "\n".join(rows)


def _sweep_table() -> str:
    from milora.comparison.sweep import SweepConfig

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, info in SweepConfig.model_fields.items():
        kind = re.sub(r"typing\.|milora\.[\w.]+\.", "", str(info.annotation))
        kind = re.sub(r"Annotated\[(\w+), .*\]", r"\1", kind) if kind.startswith("Annotated") else kind
        default = "required" if info.is_required() else f"`{_cell(repr(info.default))}`"
        rows.append(f"| `{key}` | `{_cell(kind)}` | {default} | {_cell(info.description or '')} |")
    return "\n".join(rows)


def _eval_options_table() -> str:
    from milora.eval.options import OPTIONS, describe_default, tasks_taking

    rows = ["| option | flag | tasks | default | meaning |", "|---|---|---|---|---|"]
    for option in OPTIONS.values():
        flag = f"`{option.flag}`" if option.cli else "(Python only)"
        tasks = ", ".join(f"`{task}`" for task in tasks_taking(option.name))
        default = describe_default(option) or "not set"
        rows.append(f"| `{option.name}` | {flag} | {tasks} | {_cell(default)} | {_cell(option.help)} |")
    return "\n".join(rows)


def _api_reference() -> str:
    """One mkdocstrings block per public name of `milora` (its ``_PUBLIC`` map), in order."""
    import milora

    blocks = [f"::: {module}.{name}" for name, module in sorted(milora._PUBLIC.items())]
    return "\n\n".join([*blocks, "::: milora.errors"])


def on_page_markdown(markdown: str, **_: Any) -> str:
    if "<!-- api-reference -->" in markdown:
        markdown = markdown.replace("<!-- api-reference -->", _api_reference())
    if "<!-- train-config-keys -->" in markdown:
        markdown = markdown.replace("<!-- train-config-keys -->", _train_table())
    if "<!-- eval-options -->" in markdown:
        markdown = markdown.replace("<!-- eval-options -->", _eval_options_table())
    if "<!-- sweep-config-keys -->" in markdown:
        markdown = markdown.replace("<!-- sweep-config-keys -->", _sweep_table())
    return markdown
