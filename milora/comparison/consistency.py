"""One sweep, one set of data and settings: every run of a sweep is checked against it before more run.

A sweep fingerprints (sha256) every local data file it reads: the training data, the validation
file, the test set (``eval_data``), the forgetting text and the retention data (a directory: its
files' names and contents). Each run records them in its ``job.json`` with its other settings,
and its training writes ``train/train_config.yaml``. Before a sweep runs anything,
`check_runs` compares every run already in ``output_dir`` (finished, or with a checkpoint to
resume) with what the sweep would give it now: a data file changed in place, or a setting changed
behind ``sweep.yaml``'s back (the file deleted, ``train.lora_rank`` changed), is refused with the
file and the key named, so a sweep never averages or pairs runs made on different data or
settings. Hub datasets are named, not fingerprinted (their name is a setting).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from milora.comparison.job import JOB_FILE
from milora.constants import TRAIN_CONFIG_FILE
from milora.errors import ConfigError, shown

DATA_ROLES = {"train": "train.dataset", "validation": "validation_data", "test": "eval_data",
              "forgetting": "forgetting_data", "retention": "retention_data"}
"""Each data file a sweep reads, by role, and the sweep key naming it."""
# not what a run is: where it is (a sweep directory moved elsewhere keeps its runs), and whether its
# test set is scored with it or in the test phase (`test_runs` may change between invocations)
_UNCOMPARED_KEYS = ("run_dir", "train.output_dir", "score_test")
# what the worker sets when it resumes or restarts a run's training, or gives it a finished run's start
_RUN_KEYS = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "init_from")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; of a directory, over its files' relative names and digests (sorted)."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    entries = [f"{p.relative_to(path).as_posix()}\0{file_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def data_fingerprints(train_dataset: str | None, data: dict[str, str | None]) -> dict[str, str | None]:
    """Role (`DATA_ROLES`) -> sha256 of each data file given as a local path; None for one not given
    (a default) or not local (a hub name)."""
    paths = {"train": train_dataset, **data}
    return {role: file_digest(paths[role]) if paths[role] is not None and Path(paths[role]).exists() else None
            for role in DATA_ROLES}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("train", "data_sha256", "identity"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def job_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a run's recorded job and the job the sweep gives it now, one phrase per key.

    Every train key counts, given in either; other keys (and fingerprints) where both have them (a
    job.json of an older milora lacks the newer keys); where the run is and when its test is scored
    (`_UNCOMPARED_KEYS`) do not count.
    """
    before, after = _flat(recorded), _flat(now)
    keys = [key for key in dict.fromkeys([*before, *after]) if key not in _UNCOMPARED_KEYS
            and (key.startswith("train.") or (key in before and key in after))]
    return [_phrase(key, before.get(key), after.get(key)) for key in keys
            if json.dumps(before.get(key), sort_keys=True, default=str) != json.dumps(after.get(key), sort_keys=True,
                                                                                      default=str)]


def _phrase(key: str, before: Any, after: Any) -> str:
    if key.startswith("data_sha256."):
        role = key.removeprefix("data_sha256.")
        return (f"the {role} data ({DATA_ROLES.get(role, role)}) is not the same file: sha256 {str(before)[:12]}... "
                f"then, {str(after)[:12]}... now (changed in place?)")
    return f"{key} was {shown(before)}, the sweep now gives {shown(after)}"


def _train_config_differences(path: Path, train: dict[str, Any]) -> list[str]:
    """The run's own resolved training config against the one the sweep gives it now."""
    from milora.training.config import from_dict, load_config

    saved, now = load_config(path).to_dict(), from_dict(train).as_run().to_dict()
    keys = [key for key in dict.fromkeys([*saved, *now]) if key not in _RUN_KEYS]
    return [f"{key} was {shown(saved.get(key))}, the sweep now gives {shown(now.get(key))}" for key in keys
            if saved.get(key) != now.get(key)]


def _base_view(job: dict[str, Any]) -> dict[str, Any]:
    """What the base model's scores depend on: not the training keys or data, but the model and its dtype."""
    train = {key: job["train"][key] for key in ("model", "dtype") if key in job.get("train", {})}
    data = {role: digest for role, digest in job.get("data_sha256", {}).items() if role not in ("train", "validation")}
    return {**job, "train": train, **({"data_sha256": data} if "data_sha256" in job else {})}


def _has_work(run_dir: Path, record_file: str) -> bool:
    """A run that counts: finished (a record), or with a checkpoint it would resume from."""
    return (run_dir / record_file).is_file() or any((run_dir / "train").glob("checkpoint-*"))


def check_runs(jobs: list[dict[str, Any]], record_file: str) -> None:
    """Refuse the sweep if a run in its output directory was made with other data or settings than
    ``jobs`` (every job of the sweep as `milora.comparison.job.Job.to_json`) give it now."""
    problems = []
    for job in jobs:
        run_dir = Path(job["run_dir"])
        if not _has_work(run_dir, record_file):
            continue  # nothing made yet: its job.json is rewritten and it starts afresh
        job_file, config_file = run_dir / JOB_FILE, run_dir / "train" / TRAIN_CONFIG_FILE
        if job_file.is_file():
            try:
                recorded = json.loads(job_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                problems.append(f"{job_file} cannot be read ({error}), so the run cannot be checked")
                continue
            base = job["identity"]["method"] == "base"
            differences = (["it is not an object"] if not isinstance(recorded, dict) else
                           job_differences(_base_view(recorded), _base_view(job)) if base else
                           job_differences(recorded, job))
            problems += [f"{job_file}: {difference}" for difference in differences]
        if config_file.is_file() and job["identity"]["method"] != "base":
            problems += [f"{config_file}: {difference}" for difference in _train_config_differences(config_file,
                                                                                                   job["train"])]
    if problems:
        shown_problems = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ConfigError(
            f"runs already in this sweep's output_dir were made with other data or settings: {shown_problems}. "
            "The runs of one sweep must share their data and settings: restore them, or give the new sweep another "
            "output_dir (or delete those runs' directories to re-run them)."
        )
