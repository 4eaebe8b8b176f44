"""Answers produced elsewhere (e.g. with vLLM), scored by milora: the ``--predictions`` file.

The file is JSONL, one object per item: ``{"id": ..., "output": ...}``, where ``id`` is the
item's own identifier in the task's data (IFEval's ``key``, HumanEval's ``task_id``, an AlpacaEval
index or instruction; for gsm8k, math, commonsense, vqa, pope and mcq-image, which have no ids of
their own, ``<dataset>/<index>``: the data file's dataset name as in the results and the item's
0-based position in it, e.g. ``gsm8k/0``, ``ARC-Easy/12``, the ``id`` of each item of a results
file) and ``output`` the answer (a string; for tasks that take several samples per item, a list
of strings). The file is checked against the task's
items before any work: every scored item must have exactly one line, and every line must name
an item of the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from milora.errors import DataError, DataNotFoundError, shown
from milora.io import read_records

_SHOWN = 5


def _names(values) -> str:
    values = list(values)
    text = ", ".join(shown(v) for v in values[:_SHOWN])
    return text + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")


def _output(record: dict, line: int, path: Path, samples: bool) -> str | list[str]:
    output = record.get("output")
    if isinstance(output, str):
        return output
    if samples and isinstance(output, list) and output and all(isinstance(o, str) for o in output):
        return output
    what = "a string or a non-empty list of strings" if samples else "a string"
    raise DataError(f"{path} line {line}: `output` must be {what} (got {type(output).__name__}).")


def load_predictions(path: str | Path, aliases: list[list[str]], required: Sequence[int], *,
                     samples: bool = False) -> list[str | list[str]]:
    """The outputs of the items ``required`` (indices into the data), in that order.

    ``aliases[i]``: the identifiers that name item ``i`` of the data (compared as strings, e.g. an
    AlpacaEval item's index and its instruction). ``samples``: outputs may be lists of strings.
    Raises `DataError` for a record without ``id``/``output``, an id that names no item or more than
    one (an instruction whose text is another item's index, a text given twice), two lines for one
    item, or a required item without a line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"Predictions file {path} does not exist.")
    index: dict[str, set[int]] = {}
    for i, names in enumerate(aliases):
        for name in names:
            index.setdefault(name, set()).add(i)
    found: dict[int, str | list[str]] = {}
    unknown, duplicates, ambiguous = [], [], []
    for line, record in enumerate(read_records(path), start=1):
        if "id" not in record:
            raise DataError(f"{path} line {line}: expected an object {{\"id\": ..., \"output\": ...}}.")
        items = index.get(str(record["id"]), set())
        if not items:
            unknown.append(record["id"])
        elif len(items) > 1:
            ambiguous.append(f"{shown(record['id'])} (line {line}: items {', '.join(map(str, sorted(items)))})")
        elif (item := next(iter(items))) in found:
            duplicates.append(record["id"])
        else:
            found[item] = _output(record, line, path, samples)
    if ambiguous:
        raise DataError(f"{path}: {len(ambiguous)} id(s) name more than one item of the data: "
                        f"{', '.join(ambiguous[:_SHOWN])}{' and more' if len(ambiguous) > _SHOWN else ''}. An id must "
                        "name one item: here one item's text is another's index, or the data holds the same text "
                        "twice. Make the data's texts distinct (and not numbers), or answer by an unambiguous id.")
    if unknown:
        raise DataError(f"{path}: {len(unknown)} id(s) name no item of the task's data: {_names(unknown)}. "
                        "Use the data's own identifiers (see the task's --predictions format).")
    if duplicates:
        raise DataError(f"{path}: {len(duplicates)} item(s) have more than one line: {_names(duplicates)}; "
                        "keep one answer per item.")
    missing = [aliases[i][0] for i in required if i not in found]
    if missing:
        raise DataError(f"{path}: no answer for {len(missing)} of the {len(required)} scored item(s): "
                        f"{_names(missing)}. Answer every item, or score fewer with --limit "
                        "(the first N items of the data).")
    return [found[i] for i in required]


def item_ids(datasets: Sequence[str]) -> list[str]:
    """``<dataset>/<index>`` of each item, ``datasets[i]`` being item i's dataset (items of one dataset in
    their data order)."""
    seen: dict[str, int] = {}
    ids = []
    for name in datasets:
        ids.append(f"{name}/{seen.get(name, 0)}")
        seen[name] = seen.get(name, 0) + 1
    return ids


def first_per_dataset(datasets: Sequence[str], limit: int | None) -> list[int]:
    """Indices of the first ``limit`` items of each dataset (all items when ``limit`` is None): the items
    ``--limit`` scores."""
    ids = item_ids(datasets)
    return [i for i, name in enumerate(ids) if limit is None or int(name.rsplit("/", 1)[1]) < limit]

