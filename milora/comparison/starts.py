"""Decompose once per distinct start: a sweep's run begins from the saved start of a finished run.

The start of an SVD init (milora, pissa, middle, ...) depends on the base model, the sweep's
adapter settings (shared by all its runs), the method and, for a seeded start, the seed; not on
the learning rate or the batch size. So the first finished run of a start decomposes, and every
later run of the same start passes that run's adapter to `milora train` as ``init_from``: its
initial factors, residual rebuilt without any SVD, the same model bit for bit
(`milora.adapter.load.load_start` checks the base fingerprint, init, rank, alpha and targets).
A run that finds no finished run of its start decomposes itself, so one process running the grid
in order decomposes each start once. Parallel runs (Ray trials) would each decompose a start no
run has finished yet, so `start_waves` splits the grid: the first run of each start (and every
run with no start to share) in a first wave, the runs that reuse a start in a second. Starts
computed from training batches (corda, eva, lora-ga) and starts that leave the base unchanged
(lora, dora, olora, ...) have nothing to reuse.
"""

from __future__ import annotations

import json
from pathlib import Path

from milora.adapter.load import SEEDED_INITS
from milora.comparison.job import RECORD, Job
from milora.constants import DATA_INITS, MILORA_CONFIG, RESIDUAL_INITS


def _seed_matters(method: str, adapter_dir: Path) -> bool:
    """A seeded init, or a start with exactly-zero components (their directions are drawn with the seed)."""
    if method in SEEDED_INITS:
        return True
    metadata = json.loads((adapter_dir / MILORA_CONFIG).read_text(encoding="utf-8"))
    report = metadata.get("report", []) if isinstance(metadata, dict) else []
    return not isinstance(report, list) or any(not isinstance(entry, dict) or entry.get("zero_components")
                                               for entry in report)  # an unreadable report: assume it matters


def _shareable(method: str) -> bool:
    """A start with initial factors not drawn from training batches."""
    return method in RESIDUAL_INITS and method not in DATA_INITS


def start_waves(jobs: list[Job]) -> tuple[list[Job], list[Job]]:
    """``jobs`` (in order) as two waves to run one after the other, each in parallel: the first job of each
    shareable start (method, and seed for a seeded init) and every job with nothing to share, then the jobs
    that can begin from a start of the first wave (`shared_start`). A start with exactly-zero components
    depends on the seed too, which only its decomposition reveals: a second-wave run of another seed then
    decomposes itself, as it must."""
    first, later, seen = [], [], set()
    for job in jobs:
        method = job.identity.method
        key = (method, job.identity.seed if method in SEEDED_INITS else None)
        if job.is_base or not _shareable(method) or key not in seen:
            seen.add(key)
            first.append(job)
        else:
            later.append(job)
    return first, later


def shared_start(job: Job) -> str | None:
    """The adapter directory of a finished run in ``job``'s sweep with the same start, or None.

    A candidate counts when its record (``run.json``) says done and names the same method and, where
    the seed matters, the same seed (learning rate and batch size do not enter a start).
    Unreadable records are skipped quietly (not `milora.comparison.runner.read_record`, which names
    each one on stderr: the runner already did, once, when it read the sweep)."""
    method = job.identity.method
    if not _shareable(method):
        return None
    own = Path(job.run_dir)
    for run_dir in sorted(own.parent.iterdir()):
        if run_dir == own or not (run_dir / RECORD).is_file():
            continue
        try:
            record = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(record, dict) or record.get("status") != "done" or record.get("method") != method:
            continue
        adapter_dir = Path(str(record.get("adapter_dir", "")))
        if not (adapter_dir / MILORA_CONFIG).is_file():
            continue
        try:
            if _seed_matters(method, adapter_dir) and record.get("seed") != job.identity.seed:
                continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        return str(adapter_dir)
    return None
