"""A method comparison described by one YAML file: the sweep's keys, its grid of runs, its data split.

A sweep trains every init method at every learning rate of its grid (given, or ``auto``: built from
published ratios to LoRA's best rate, `milora.comparison.grid`), optionally at every batch size of
``batch_sizes``, with every seed, all other `milora train` keys shared (``train``, or
``train_config`` plus ``train``), and scores each run on a validation split (for choosing each
method's learning rate). The test set is scored once the grid has finished: for each method's
chosen runs only (``test_runs: chosen``, the default: the only test scores the report uses), or
for every run (``test_runs: all``). `load_sweep`
validates everything before anything runs or is written: unknown keys (closest key named),
unknown methods, empty grids, non-integer seeds, a validation split sharing item text with the
test set, a test set under 20 items, Ray requested but not installed.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from milora.comparison.consistency import data_fingerprints
from milora.comparison.grid import auto_grid
from milora.constants import INIT_MODES
from milora.errors import ConfigError, DataError, shown
from milora.io import check_output_dir, read_records, read_yaml_mapping
from milora.training.config import from_dict as train_config_from_dict
from milora.training.config import parse_overrides
from milora.training.config_checks import method_only_keys

MIN_TEST_ITEMS = 20
# train keys the sweep sets per run: giving them in `train` would be silently overridden
SET_BY_SWEEP = ("init", "learning_rate", "seed", "output_dir", "resume_from_checkpoint", "overwrite_output_dir",
                "val_size")
# keys whose change only extends or re-runs the grid (methods, rates, seeds) or moves the work elsewhere
GRID_KEYS = ("methods", "learning_rates", "seeds", "batch_sizes", "lora_rate", "rate_span", "rate_points", "backend",
             "ray_address", "gpus_per_run", "cpus_per_run", "retry_failed", "test_runs")


def _integer_list(value: Any) -> Any:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def _number_list(value: Any) -> Any:
    """YAML 1.1 reads 3e-4 as a string: accept numeric strings in learning-rate lists."""
    def number(item):
        try:
            return float(item) if isinstance(item, str) else item
        except ValueError:
            return item

    if isinstance(value, Mapping):
        return {key: [number(item) for item in items] if isinstance(items, list) else items
                for key, items in value.items()}
    return [number(item) for item in value] if isinstance(value, list) else value


class SweepConfig(BaseModel):
    """Every key of a sweep. Paths are relative to the current directory."""

    model_config = ConfigDict(extra="forbid", strict=True)

    output_dir: str = Field(description="directory for the runs, the report (compare.md/json) and the plots")
    train: dict[str, Any] = Field({}, description="milora train keys shared by every run")
    train_config: str | None = Field(None, description="a milora train YAML whose keys every run shares "
                                                       "(`train` overrides)")
    methods: list[Literal[INIT_MODES]] = Field(["lora", "pissa", "milora"], min_length=1,
                                               description="init modes compared")
    learning_rates: Annotated[list[float] | dict[str, list[float]] | Literal["auto"],
                              BeforeValidator(_number_list)] = Field(
        description="learning-rate grid: one list for every method, a mapping method -> list, or auto (each "
                    "method's grid around lora_rate / its published ratio, see milora.comparison.grid)")
    lora_rate: Annotated[float | None, BeforeValidator(lambda v: float(v) if isinstance(v, str) else v)] = Field(
        None, gt=0, description="learning_rates: auto: LoRA's best rate, the reference the grids are centred from")
    rate_span: float = Field(3.0, gt=1, description="learning_rates: auto: each grid runs from centre / span to "
                                                    "centre * span")
    rate_points: int = Field(3, ge=1, description="learning_rates: auto: rates per grid, log-evenly spaced")
    batch_sizes: Annotated[list[int], BeforeValidator(_integer_list)] | None = Field(
        None, min_length=1, description="optional batch-size axis: per_device_train_batch_size of the runs, each "
                                        "(rate, batch size) pair chosen on validation like a rate")
    seeds: Annotated[list[int], BeforeValidator(_integer_list)] = Field([0, 1, 2], min_length=1,
                                                                       description="seeds of every (method, rate)")
    eval_task: str = Field(description="milora eval task scored on validation and test (e.g. gsm8k, commonsense)")
    eval_data: str | None = Field(None, description="test data of eval_task (as milora eval --data)")
    eval_options: dict[str, Any] = Field({}, description="other options of eval_task, e.g. {scorer: loglik}")
    validation_data: str | None = Field(None, description="validation file (eval_task's format), never the test set")
    validation_size: int | None = Field(None, ge=1, description="or: hold out this many training records as validation")
    split_seed: int = Field(0, description="seed of the held-out validation draw")
    test_limit: int | None = Field(None, ge=MIN_TEST_ITEMS, description="score the first N test items per dataset")
    eval_batch_size: int = Field(16, ge=1, description="batch size of every evaluation")
    eval_server: str | None = Field(None, description="a running vLLM URL: validation and test generate there, each "
                                    "run's adapter loaded at run time (docs/serving.md); forgetting stays local")
    forgetting: bool = Field(True, description="measure forgetting (KL to the base model on general text) per run")
    forgetting_data: str | None = Field(None, description="general text for forgetting (default: milora eval's)")
    forgetting_windows: int = Field(16, ge=1, description="text windows scored for forgetting")
    forgetting_length: int = Field(256, ge=2, description="tokens per forgetting window")
    retention_task: str | None = Field(None, description="optional knowledge-retention probe: a second eval task")
    retention_data: str | None = Field(None, description="its data")
    retention_options: dict[str, Any] = Field({}, description="its options, e.g. {scorer: loglik}")
    retention_limit: int | None = Field(None, ge=1, description="items of the retention probe per dataset")
    analyze: bool = Field(True, description="milora analyze summary of each selected adapter")
    baseline: Literal[INIT_MODES] = Field("lora", description="the method others are compared with")
    backend: Literal["local", "ray"] = Field("local", description="local: one run after the other, each in a process")
    ray_address: str | None = Field(None, description="an existing Ray cluster (default: a local instance)")
    cpus_per_run: float = Field(1, gt=0, description="Ray resources of one run")
    gpus_per_run: float = Field(0, ge=0, description="Ray resources of one run")
    retry_failed: bool = Field(False, description="re-run runs recorded as failed (default: keep their record)")
    test_runs: Literal["chosen", "all"] = Field(
        "chosen", description="which runs the test set scores, after the grid: each method's chosen runs (the "
                              "report's), or all (a test curve at every rate too)")

    def rates_for(self, method: str) -> list[float]:
        if self.learning_rates == "auto":
            return auto_grid(method, self.lora_rate, self.rate_span, self.rate_points)
        return list(self.learning_rates.get(method, []) if isinstance(self.learning_rates, dict)
                    else self.learning_rates)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid; ``name`` is its directory under ``output_dir/runs``."""

    method: str
    learning_rate: float
    seed: int
    batch_size: int | None = None  # None: the shared train key's

    @property
    def name(self) -> str:
        batch = "" if self.batch_size is None else f"-bs{self.batch_size}"
        return f"{self.method}-lr{self.learning_rate:.3g}{batch}-seed{self.seed}"


@dataclass
class Sweep:
    """A validated sweep: its config, the shared train keys, its runs and its data files."""

    config: SweepConfig
    train: dict[str, Any]
    runs: list[RunSpec]
    output_dir: Path

    @property
    def train_file(self) -> Path:
        """The training records every run trains on (the held-out validation records removed)."""
        return self.output_dir / "data" / "train.jsonl" if self.config.validation_size else Path(self.train["dataset"])

    @property
    def validation_file(self) -> Path:
        return self.output_dir / "data" / "validation.jsonl" if self.config.validation_size else Path(
            self.config.validation_data)

    @functools.cached_property
    def data_sha256(self) -> dict[str, str | None]:
        """sha256 of each local data file the sweep reads, by role (`milora.comparison.consistency`)."""
        config = self.config
        return data_fingerprints(self.train["dataset"], {
            "validation": config.validation_data, "test": config.eval_data, "forgetting": config.forgetting_data,
            "retention": config.retention_data})

    def resolved(self) -> dict[str, Any]:
        """The sweep as written back into output_dir (sweep.yaml): every key, the train keys merged."""
        return {**self.config.model_dump(), "train": self.train, "train_config": None}


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, list(SweepConfig.model_fields), n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else "run `milora compare --list-keys` for the valid keys"


def _validate(values: Mapping[str, Any]) -> SweepConfig:
    unknown = [key for key in values if key not in SweepConfig.model_fields]
    if unknown:
        raise ConfigError("; ".join(f"unknown sweep key {shown(key)}: {_closest(str(key))}" for key in unknown))
    try:
        return SweepConfig.model_validate(dict(values))
    except ValidationError as error:
        messages = []
        for problem in error.errors(include_url=False):
            where = ".".join(str(part) for part in problem["loc"])
            messages.append(f"'{where}': {problem['msg']} (got {shown(problem.get('input'))})")
        raise ConfigError("invalid sweep: " + "; ".join(messages)) from error


def load_sweep(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> Sweep:
    """A validated `Sweep` from a YAML file or a mapping, with ``key=value`` overrides (``train.key=v`` too)."""
    values = dict(source) if isinstance(source, Mapping) else read_yaml_mapping(source, "it needs at least "
                                                                                "output_dir, learning_rates, eval_task")
    for key, value in parse_overrides(overrides).items():
        if key.startswith("train."):
            values["train"] = {**values.get("train", {}), key.removeprefix("train."): value}
        else:
            values[key] = value
    config = _validate(values)
    train = _shared_train_keys(config)
    runs = _grid(config)
    sweep = Sweep(config, train, runs, Path(config.output_dir))
    _check_data(sweep)
    if sweep.config.eval_server is not None:
        _check_server(sweep.config)
    check_output_dir(sweep.output_dir)
    if config.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("backend: ray needs Ray: `pip install 'milora[ray]'` (or use backend: local).")
    return sweep


def _shared_train_keys(config: SweepConfig) -> dict[str, Any]:
    train = dict(read_yaml_mapping(config.train_config) if config.train_config else {})
    train.update(config.train)
    fixed = [key for key in (*SET_BY_SWEEP, *(["per_device_train_batch_size"] if config.batch_sizes else []))
             if key in train]
    if fixed:
        raise ConfigError(
            f"train key(s) {', '.join(fixed)} are set by the sweep for each run: use methods, learning_rates, seeds, "
            "batch_sizes and output_dir (and validation_size for held-out records)."
        )
    if "dataset" not in train:
        raise ConfigError("the sweep's train keys need 'dataset': the training data every run shares.")
    for method in config.methods:  # every shared key checked as milora train checks it (unknown key, type, range)
        probe = {**method_train_keys(train, method), "output_dir": str(Path(config.output_dir) / "runs" / "probe"),
                 "init": method}
        train_config_from_dict(probe)
    return train


def method_train_keys(train: dict[str, Any], method: str) -> dict[str, Any]:
    """The shared train keys as ``method``'s runs take them: without the keys only other methods read
    (e.g. calibration_batches, for the data starts)."""
    return {key: value for key, value in train.items() if key not in method_only_keys(method)}


def _grid(config: SweepConfig) -> list[RunSpec]:
    if config.baseline not in config.methods:
        raise ConfigError(f"baseline {config.baseline!r} is not among the methods {config.methods}: "
                          "add it or choose another.")
    if (config.learning_rates == "auto") != (config.lora_rate is not None):
        raise ConfigError("learning_rates: auto needs lora_rate (LoRA's best rate, the grids' reference), and "
                          "lora_rate is only for learning_rates: auto: set both, or give the rates by hand.")
    if config.batch_sizes and len(set(config.batch_sizes)) != len(config.batch_sizes):
        raise ConfigError(f"batch_sizes {config.batch_sizes} repeat a size: give distinct sizes.")
    if any(size < 1 for size in config.batch_sizes or []):
        raise ConfigError(f"batch_sizes must be positive, got {config.batch_sizes}.")
    if isinstance(config.learning_rates, dict):
        extra = sorted(set(config.learning_rates) - set(config.methods))
        missing = [method for method in config.methods if method not in config.learning_rates]
        if extra or missing:
            raise ConfigError(f"learning_rates must give a list for each method: missing {missing}, unknown {extra}.")
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds {config.seeds} repeat a seed: give distinct seeds.")
    runs = []
    for method in config.methods:
        rates = config.rates_for(method)
        if not rates:
            raise ConfigError(f"the learning-rate list of {method} is empty: give at least one rate.")
        if any(rate <= 0 for rate in rates) or len(set(rates)) != len(rates):
            raise ConfigError(f"learning rates of {method} must be positive and distinct, got {rates}.")
        runs += [RunSpec(method, float(rate), seed, batch) for rate in rates for batch in config.batch_sizes or [None]
                 for seed in config.seeds]
    return runs


def _item_texts(records: list[dict]) -> set[str]:
    """What identifies an evaluation item: its question text, whitespace-normalised."""
    texts = set()
    for record in records:
        for key in ("question", "instruction", "problem", "query", "prompt"):
            if isinstance(record.get(key), str):
                texts.add(" ".join(record[key].split()) + " || " + " ".join(str(record.get("input") or "").split()))
                break
    return texts


def _test_records(sweep: Sweep) -> list[dict]:
    data = sweep.config.eval_data
    if data is None or not Path(data).exists():
        raise ConfigError(f"eval_data {data!r} is not a local file or directory: the sweep checks the test set before "
                          "training (size, no overlap with validation), so it needs the test data on disk.")
    path = Path(data)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl"))
    records = []
    for file in files:
        taken = read_records(file, single_object=True)
        records += taken if sweep.config.test_limit is None else taken[: sweep.config.test_limit]
    return records


def _check_data(sweep: Sweep) -> None:
    config = sweep.config
    if (config.validation_data is None) == (config.validation_size is None):
        raise ConfigError("give exactly one of validation_data (a file) and validation_size (records held out from "
                          "the training data): the learning rate is chosen on validation, never on the test set.")
    test = _test_records(sweep)
    if len(test) < MIN_TEST_ITEMS:
        raise ConfigError(f"the test set has {len(test)} items: at least {MIN_TEST_ITEMS} are needed for a comparison.")
    validation = validation_records(sweep)
    shared = _item_texts(validation) & _item_texts(test)
    if shared:
        example = next(iter(shared)).split(" || ")[0][:80]
        raise ConfigError(f"{len(shared)} validation item(s) also appear in the test set (e.g. {example!r}): the "
                          "validation split must not overlap the test data.")
    _check_records(sweep, validation)


def _check_records(sweep: Sweep, validation: list[dict]) -> None:
    """Every record of every evaluation file read as its task reads it (question, gold answer, ...), and the
    task options checked, before any run trains: a record without its answer would fail every run."""
    import tempfile

    from milora.eval.registry import find_task

    config = sweep.config
    checks = [(config.eval_task, config.eval_data, config.eval_options)]
    if config.validation_data is not None:
        checks.append((config.eval_task, config.validation_data, config.eval_options))
    if config.retention_task is not None:
        checks.append((config.retention_task, config.retention_data, config.retention_options))
    for task, data, options in checks:
        find_task(task)[0].check_local_data(data, options)
    if config.validation_size:  # the held-out training records, scored with eval_task
        with tempfile.TemporaryDirectory(prefix="milora-validation-") as folder:
            path = Path(folder) / "held_out_validation.jsonl"
            path.write_text("".join(json.dumps(record, default=str) + "\n" for record in validation), encoding="utf-8")
            try:
                find_task(config.eval_task)[0].check_local_data(path, config.eval_options)
            except DataError as error:
                raise DataError(f"the validation records held out of {sweep.train['dataset']} (validation_size="
                                f"{config.validation_size}) cannot be scored by {config.eval_task}: {error}") from error


def _check_server(config: SweepConfig) -> None:
    """An eval_server must answer and its eval_task generate through it, before any run trains."""
    from milora.eval.registry import find_task
    from milora.eval.runner import check_server_task
    from milora.eval.server import base_url, list_models

    check_server_task(find_task(config.eval_task)[0], config.eval_task)
    if config.eval_options.get("scorer") == "loglik":
        raise ConfigError("eval_server generates; eval_options scorer: loglik needs the model's logits: drop one.")
    list_models(base_url(config.eval_server))


def validation_records(sweep: Sweep) -> list[dict]:
    """The validation records: the given file, or a seeded draw of validation_size training records."""
    config = sweep.config
    if config.validation_data is not None:
        if not Path(config.validation_data).is_file():
            raise ConfigError(f"validation_data file not found: {config.validation_data}.")
        return read_records(config.validation_data)
    return _split(sweep)[1]


def _split(sweep: Sweep) -> tuple[list[dict], list[dict]]:
    from milora.training.data import load_records  # local files, dataset directories and hub datasets

    train = sweep.train
    records = load_records(train["dataset"], train.get("dataset_split", "train"), train.get("dataset_config"))
    size = sweep.config.validation_size
    if size >= len(records):
        raise ConfigError(f"validation_size={size} leaves no training records out of {len(records)}: lower it.")
    order = list(range(len(records)))
    random.Random(sweep.config.split_seed).shuffle(order)
    held = set(order[:size])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def write_split(sweep: Sweep) -> None:
    """Write the training and validation files of a validation_size sweep (idempotent)."""
    from milora.io import atomic_write_text

    if not sweep.config.validation_size:
        return
    train, validation = _split(sweep)
    for path, records in ((sweep.train_file, train), (sweep.validation_file, validation)):
        atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n"
                                        for record in records))


def shared_settings_digest(resolved: dict[str, Any]) -> dict[str, str]:
    """Per shared key (``train.<key>`` for the train keys), a digest of its value: what must not change
    between runs of one sweep."""
    flat = {f"train.{key}": value for key, value in resolved.get("train", {}).items()}
    flat.update({key: value for key, value in resolved.items() if key not in (*GRID_KEYS, "train", "train_config")})
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for key, value in flat.items()}
