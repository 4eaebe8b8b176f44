"""One run of a sweep as the worker gets it: `Job`, written to and read from ``runs/<name>/job.json``.

The file holds `Job.to_json` (one JSON object, the field names as keys, ``identity`` an object);
`Job.from_json` also reads the job.json of older milora versions, which lacked the keys that have a
default here (``eval_server``, ``identity.batch_size``, ...), so a sweep resumes across versions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from milora.errors import ConfigError
from milora.io import atomic_write_json

JOB_FILE = "job.json"
RECORD = "run.json"
"""A run\'s record, written last by the worker: a run with one is finished."""


@dataclass(frozen=True)
class RunIdentity:
    """What names a run in the grid; every record of the run starts with it (`as_record`).
    ``method`` is ``"base"`` (and the rest None) for the base model's own scores."""

    method: str
    learning_rate: float | None = None
    seed: int | None = None
    batch_size: int | None = None  # only on a grid with a batch axis

    def as_record(self) -> dict[str, Any]:
        record = {"method": self.method, "learning_rate": self.learning_rate, "seed": self.seed}
        return record if self.batch_size is None else {**record, "batch_size": self.batch_size}


@dataclass(frozen=True)
class Job:
    """A run: train with ``train`` (a `milora train` config mapping; the base scores train nothing), then
    score ``eval_task`` on validation (and on test when ``score_test``; otherwise the sweep's test phase
    may score it later, `milora.comparison.worker.score_tests`), forgetting and the retention probe,
    under ``run_dir``."""

    name: str
    run_dir: str
    identity: RunIdentity
    train: dict[str, Any]
    eval_task: str | None = None
    eval_data: str | None = None
    eval_options: dict[str, Any] = field(default_factory=dict)
    validation_data: str | None = None
    test_limit: int | None = None
    score_test: bool = True
    eval_batch_size: int = 16
    eval_server: str | None = None
    forgetting: bool = False
    forgetting_data: str | None = None
    forgetting_windows: int | None = None
    forgetting_length: int | None = None
    retention_task: str | None = None
    retention_data: str | None = None
    retention_options: dict[str, Any] = field(default_factory=dict)
    retention_limit: int | None = None
    data_sha256: dict[str, str | None] = field(default_factory=dict)  # by role (`milora.comparison.consistency`)

    @property
    def is_base(self) -> bool:
        return self.identity.method == "base"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "identity": self.identity.as_record()}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "job") -> Job:
        """The job of a job.json object; a key this milora does not know, or a missing one, is a `ConfigError`."""
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING]
        identity = data.get("identity")
        identity = identity if isinstance(identity, dict) else {}
        unknown = sorted(set(data) - {f.name for f in fields}) + sorted(
            f"identity.{key}" for key in set(identity) - {f.name for f in dataclasses.fields(RunIdentity)})
        missing = [name for name in required if name not in data] + ["identity.method"] * ("method" not in identity)
        if unknown or missing:
            problem = "; ".join(f"{what} keys {', '.join(keys)}" for what, keys in (("unknown", unknown),
                                                                                     ("missing", missing)) if keys)
            raise ConfigError(f"{source} is not a job of this milora version ({problem}): run `milora compare` "
                              "again with the sweep's YAML, which rewrites the job files of the runs still to do.")
        return cls(**{**data, "identity": RunIdentity(**identity)})

    def write(self) -> Path:
        path = Path(self.run_dir) / JOB_FILE
        atomic_write_json(path, self.to_json())
        return path


def read_job(path: str | Path) -> Job:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"Cannot read the sweep job {path}: {error}.") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a sweep job (a JSON object).")
    return Job.from_json(data, str(path))
