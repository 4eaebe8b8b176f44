"""Running a sweep's grid: resumably, on this machine one process at a time, or as Ray Tune trials.

Layout of ``output_dir``: ``sweep.yaml`` (the resolved sweep, written once the sweep is
accepted), ``data/`` (the training and held-out validation records of a validation_size
sweep), ``runs/<method>-lr<rate>-seed<seed>/`` (``job.json``, ``train/`` = the `milora train`
output, ``validation.json`` / ``test.json`` / ``forgetting.json`` eval results, ``run.json`` =
the run's record, written last), ``runs/base/`` (the base model's scores), and the report.
Each ``job.json`` holds the sha256 of every data file the sweep reads (`milora.comparison.consistency`).

Resuming: a run with a record is finished and is skipped (a failed one too, unless
``retry_failed``); a run killed mid-way resumes from its last checkpoint. Changing a shared
setting of a sweep that has runs is refused, naming the key, and so is a run whose own job.json or
train_config.yaml disagrees with the sweep (a data file changed in place, sweep.yaml deleted and a
setting changed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from milora.comparison.consistency import check_runs
from milora.comparison.job import JOB_FILE, Job, RunIdentity
from milora.comparison.sweep import GRID_KEYS, RunSpec, Sweep, method_train_keys, shared_settings_digest, write_split
from milora.comparison.worker import IN_USE, RECORD, STOPPED
from milora.errors import ConfigError, MiloraError, StoppedError
from milora.io import atomic_write_json, read_yaml_mapping

SWEEP_FILE = "sweep.yaml"
RECORD_KEYS = frozenset({"method", "learning_rate", "seed", "status"})


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray runs trials in their own working directory); hub names kept."""
    return str(Path(path).absolute()) if path is not None and Path(path).exists() else path


def job_for(sweep: Sweep, spec: RunSpec | None) -> Job:
    """Everything the worker needs for one run (``spec=None``: the base model's scores)."""
    config = sweep.config
    name = spec.name if spec is not None else "base"
    run_dir = (sweep.output_dir / "runs" / name).absolute()
    train = {**sweep.train, "dataset": _absolute(str(sweep.train_file)), "output_dir": str(run_dir / "train")}
    if sweep.config.validation_size:  # the runs read the split written under output_dir/data, a local file
        train = {key: value for key, value in train.items() if key not in ("dataset_split", "dataset_config")}
    for key in ("model", "deepspeed"):
        if train.get(key) is not None:
            train[key] = _absolute(train[key])
    identity = RunIdentity("base")
    if spec is not None:
        train = {**method_train_keys(train, spec.method), "init": spec.method, "learning_rate": spec.learning_rate,
                 "seed": spec.seed}
        identity = RunIdentity(spec.method, spec.learning_rate, spec.seed, spec.batch_size)
        if spec.batch_size is not None:
            train["per_device_train_batch_size"] = spec.batch_size
    return Job(
        name=name, run_dir=str(run_dir), identity=identity, train=train,
        eval_task=config.eval_task, eval_data=_absolute(config.eval_data), eval_options=config.eval_options,
        validation_data=str(sweep.validation_file.absolute()), test_limit=config.test_limit,
        score_test=spec is None or config.test_runs == "all",
        eval_batch_size=config.eval_batch_size, eval_server=config.eval_server, forgetting=config.forgetting,
        forgetting_data=_absolute(config.forgetting_data), forgetting_windows=config.forgetting_windows,
        forgetting_length=config.forgetting_length, retention_task=config.retention_task,
        retention_data=_absolute(config.retention_data), retention_options=config.retention_options,
        retention_limit=config.retention_limit, data_sha256=sweep.data_sha256,
    )


def check_same_sweep(sweep: Sweep) -> None:
    """Refuse a sweep whose shared settings differ from those of the runs already in output_dir."""
    path = sweep.output_dir / SWEEP_FILE
    if not path.is_file():
        return
    before, now = shared_settings_digest(read_yaml_mapping(path)), shared_settings_digest(sweep.resolved())
    changed = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
    if changed:
        raise ConfigError(
            f"{sweep.output_dir} holds runs of a sweep with other settings: {', '.join(changed)} changed "
            f"(see {path}). Only {', '.join(GRID_KEYS)} may change between runs of one sweep: restore the settings, "
            "or give the new sweep another output_dir."
        )


def pending(sweep: Sweep) -> list[Job]:
    """The jobs still to run: the base scores first, then the grid, skipping finished runs."""
    jobs = []
    for spec in [None, *sweep.runs]:
        job = job_for(sweep, spec)
        record = read_record(Path(job.run_dir))
        if record is None or (record["status"] == "failed" and sweep.config.retry_failed):
            jobs.append(job)
    return jobs


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record, or None for an unfinished run: no ``run.json``, or one that is not a record
    (truncated, ``{}``, ``[1, 2]``, an unknown status), which is named on stderr and run again."""
    path = run_dir / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"cannot be read as JSON ({error})"
    else:
        if isinstance(record, dict) and record.get("status") in ("done", "failed") and record.keys() >= RECORD_KEYS:
            return record
        problem = f"is not a run record (a JSON object with status 'done' or 'failed' and {sorted(RECORD_KEYS)})"
    print(f"milora compare: {path} {problem}; the run is treated as unfinished and run again.", file=sys.stderr)
    return None


def prepare(sweep: Sweep) -> list[Job]:
    """Accept the sweep: write its data split and sweep.yaml, and each pending job's job.json."""
    import yaml

    from milora.io import atomic_write_text

    check_same_sweep(sweep)
    check_runs([job_for(sweep, spec).to_json() for spec in [None, *sweep.runs]], RECORD)
    write_split(sweep)
    atomic_write_text(sweep.output_dir / SWEEP_FILE, yaml.safe_dump(sweep.resolved(), sort_keys=False))
    jobs = pending(sweep)
    for job in jobs:
        job.write()
    return jobs


STOP_GRACE_SECONDS = 600.0
"""How long a Ctrl-C waits for the worker to save its checkpoint before killing it (a second Ctrl-C: at once)."""


def _die_with_parent(parent: int) -> None:
    """In the worker, before exec: SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    ``kill -9`` of ``milora compare`` does not leave its run going (holding the run's lock)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the prctl
            os._exit(1)


def start_worker(argv: list[str], **popen) -> subprocess.Popen:
    """``argv`` in its own process group (a terminal's Ctrl-C reaches only the parent, which forwards
    one SIGINT), killed when this process dies."""
    parent = os.getpid()
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, process_group=0,
                            preexec_fn=lambda: _die_with_parent(parent), **popen)


def _wait(process: subprocess.Popen, name: str) -> int:
    """The worker's exit status; on Ctrl-C, one SIGINT forwarded (it checkpoints and stops) and up to
    `STOP_GRACE_SECONDS` for it, a second Ctrl-C kills it; then `StoppedError`."""
    import signal

    try:
        return process.wait()
    except KeyboardInterrupt as interrupt:
        print(f"\nmilora compare: stopping {name}: waiting for it to save its checkpoint "
              "(Ctrl-C again to kill it at once).", file=sys.stderr, flush=True)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        raise StoppedError(f"stopped during {name}; re-run the same command to continue the sweep.") from interrupt


def _run_worker(arguments: list[str], name: str, progress: bool) -> tuple[int, str]:
    """``python -m milora.comparison ARGUMENTS`` in a fresh process: its exit status and the tail of its
    stderr (shown as it runs when ``progress``)."""
    with tempfile.TemporaryFile() as stderr:
        process = start_worker([sys.executable, "-m", "milora.comparison", *arguments],
                               **({} if progress else {"stdout": subprocess.DEVNULL, "stderr": stderr}))
        returncode = _wait(process, name)
        stderr.seek(0)
        return returncode, "(see the output above)" if progress else stderr.read()[-2000:].decode(errors="replace")


def run_local(jobs: list[Job], progress: bool = True) -> None:
    """One job after the other, each in a fresh Python process (a crash or a leak stays in it). A run
    held by another live process is left unfinished (not failed); Ctrl-C stops after its checkpoint."""
    for index, job in enumerate(jobs, start=1):
        if progress:
            print(f"milora compare: [{index}/{len(jobs)}] {job.name}", file=sys.stderr, flush=True)
        run_dir = Path(job.run_dir)
        returncode, tail = _run_worker([str(run_dir / JOB_FILE)], job.name, progress)
        if returncode == IN_USE:
            print(f"milora compare: {job.name} is held by another live process; left unfinished (not failed): "
                  "re-run when it has ended.", file=sys.stderr)
        elif returncode == STOPPED:
            raise StoppedError(f"{job.name} was stopped; re-run the same command to continue the sweep.")
        elif read_record(run_dir) is None:  # the process died before it could write its record
            atomic_write_json(run_dir / RECORD, {
                **job.identity.as_record(), "status": "failed",
                "error": f"the run's process exited with status {returncode}", "stderr": tail,
            })


def score_tests_local(jobs: list[Job], progress: bool = True) -> None:
    """The test phase of finished runs, all in one fresh process (each run's base model loaded anew);
    a failure is a `MiloraError`: the records it did not reach keep no test score, and re-running
    the sweep scores them."""
    if progress:
        print(f"milora compare: test set, {len(jobs)} run(s): {', '.join(job.name for job in jobs)}",
              file=sys.stderr, flush=True)
    for job in jobs:
        job.write()
    returncode, tail = _run_worker(["--test", *(str(Path(job.run_dir) / JOB_FILE) for job in jobs)], "the test phase",
                                   progress)
    if returncode == STOPPED:
        raise StoppedError("the test phase was stopped; re-run the same command to continue the sweep.")
    if returncode != 0:
        raise MiloraError(f"the test phase's process exited with status {returncode}: {tail}\nRe-running the same "
                          "command scores the runs it did not reach.")


def run_ray(jobs: list[Job], sweep: Sweep, test: bool = False) -> None:
    """Every job as a Ray Tune trial with ``cpus_per_run`` / ``gpus_per_run`` (ray_address: a cluster
    whose workers see output_dir at the same path, e.g. a shared file system); ``test``: the jobs'
    test phase (`score_tests`) instead of their runs. Runs go in two waves (`start_waves`) so that
    parallel trials decompose each start once."""
    import ray

    from milora.comparison.starts import start_waves

    config = sweep.config
    ray.init(address=config.ray_address, ignore_reinit_error=True, log_to_driver=False,
             **({} if config.ray_address else {"num_cpus": None}))
    try:
        if test:
            _tune(jobs, sweep, "milora-compare-test", test=True)
            return
        for name, wave in zip(("milora-compare-starts", "milora-compare"), start_waves(jobs), strict=True):
            if wave:
                _tune(wave, sweep, name, test=False)
    finally:
        if config.ray_address is None:
            ray.shutdown()


def _tune(jobs: list[Job], sweep: Sweep, name: str, test: bool) -> None:
    """``jobs`` as one Ray Tune experiment ``name``, as many at once as the resources allow."""
    from ray import tune

    config = sweep.config
    trainable = tune.with_resources(_ray_trial, {"cpu": config.cpus_per_run, "gpu": config.gpus_per_run})
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search([job.to_json() for job in jobs]), "test": test},
        tune_config=tune.TuneConfig(max_concurrent_trials=None),
        run_config=tune.RunConfig(name=name, storage_path=str((sweep.output_dir / "ray").absolute()), verbose=0),
    )
    tuner.fit()


def _ray_trial(params: dict) -> None:
    """A Ray Tune trial: the same `run_one` (or `score_tests`) as a local run, the record reported as the
    trial's result."""
    from ray import tune

    from milora.comparison.worker import run_base, run_one, score_tests

    job = Job.from_json(params["job"])
    if params.get("test"):
        score_tests([job])
        record = read_record(Path(job.run_dir)) or {}
    else:
        record = (run_base if job.is_base else run_one)(job)
    tune.report({key: value for key, value in record.items() if isinstance(value, (int, float, str, type(None)))})
