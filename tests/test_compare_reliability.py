"""`milora compare` under damage: broken run records, and the report's interval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from milora.comparison.runner import read_record
from milora.comparison.worker import RECORD

GOOD = {"method": "lora", "learning_rate": 0.01, "seed": 0, "status": "done"}


@pytest.mark.parametrize("text", ["", '{"method": "lora", "stat', "{}", "[1, 2]", "null", '"done"',
                                  json.dumps({**GOOD, "status": "running"}), "\xff\xfe"],
                         ids=["empty", "truncated", "empty object", "list", "null", "string", "unknown status",
                              "not utf-8"])
def test_a_broken_run_record_is_named_and_the_run_is_unfinished(tmp_path, capsys, text):
    (tmp_path / RECORD).write_bytes(text.encode("latin-1") if text == "\xff\xfe" else text.encode())
    assert read_record(tmp_path) is None
    assert f"{tmp_path / RECORD} " in capsys.readouterr().err


def test_a_good_run_record_is_read(tmp_path, capsys):
    (tmp_path / RECORD).write_text(json.dumps(GOOD))
    assert read_record(tmp_path) == GOOD and capsys.readouterr().err == ""


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its reaper)."""
    try:
        return "\nState:\tZ" not in open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False


PARENT = """
import sys, time
from milora.comparison.runner import start_worker
child = start_worker([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_compare_parent_kills_its_worker():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    for _ in range(200):  # the kernel signals it at once; allow it to be scheduled
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child)


def _job(tmp_path):
    """A run's job.json holding only the keys every milora version wrote (the others take their defaults)."""
    from milora.comparison.job import read_job

    run_dir = tmp_path / "runs" / "lora-lr0.01-seed0"
    run_dir.mkdir(parents=True)
    identity = {key: GOOD[key] for key in ("method", "learning_rate", "seed")}
    job = {"name": run_dir.name, "run_dir": str(run_dir), "identity": identity, "train": {}}
    (run_dir / "job.json").write_text(json.dumps(job))
    return read_job(run_dir / "job.json")


def test_a_run_held_by_a_live_process_is_not_recorded_as_failed(tmp_path, monkeypatch, capsys):
    from milora.comparison import runner, worker
    from milora.io import RunLock

    job = _job(tmp_path)
    run_dir = Path(job.run_dir)

    def train_held(config):
        with RunLock(run_dir / "train"), RunLock(run_dir / "train"):  # the second is refused: held, live
            pass

    monkeypatch.setattr("milora.training.run.train", train_held)
    assert worker.main([str(run_dir / "job.json")]) == worker.IN_USE
    assert not (run_dir / RECORD).exists() and "is in use by" in capsys.readouterr().err
    # and the parent, told so by the worker's status, writes no failed record
    real_start = runner.start_worker
    monkeypatch.setattr(runner, "start_worker", lambda argv, **popen: real_start(
        [sys.executable, "-c", f"import sys; sys.exit({worker.IN_USE})"], **popen))
    runner.run_local([job], progress=False)
    assert not (run_dir / RECORD).exists() and "left unfinished (not failed)" in capsys.readouterr().err


CHECKPOINTING_WORKER = """
import pathlib, signal, sys, time
def stop(*_):
    time.sleep(1.0)  # a checkpoint that takes a while (the old parent killed it after 0.25 s)
    pathlib.Path("checkpoint").write_text("saved")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
pathlib.Path("ready").write_text("")
time.sleep(120)
"""


def test_ctrl_c_lets_the_worker_finish_its_checkpoint_then_stops_cleanly(tmp_path, monkeypatch):
    from milora.comparison import runner
    from milora.errors import StoppedError

    job = _job(tmp_path)
    monkeypatch.chdir(tmp_path)
    real_start = runner.start_worker
    monkeypatch.setattr(runner, "start_worker", lambda argv, **popen: real_start(
        [sys.executable, "-c", CHECKPOINTING_WORKER], **popen))
    # Ctrl-C as at a terminal: a suite started in the background (`make test &`) inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def press_ctrl_c():
        while not (tmp_path / "ready").exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    try:
        with pytest.raises(StoppedError, match="re-run the same command"):
            runner.run_local([job], progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "checkpoint").read_text() == "saved"
    assert not (Path(job.run_dir) / RECORD).exists()  # stopped, not failed


def test_a_sweep_whose_every_run_failed_still_plots_and_replaces_old_figures(tmp_path):
    from milora.comparison.report import methods_table, plot
    from milora.comparison.summary import summarise

    records = [{"method": method, "learning_rate": 1e30, "seed": seed, "status": "failed",
                "reason": "diverged (NaN/Inf)", "error": "FloatingPointError: diverged"}
               for method in ("lora", "milora") for seed in (0, 1)]
    summary = summarise(records, ["lora", "milora"], "lora")
    assert [m["status"] for m in summary["methods"]] == ["failed", "failed"]
    assert methods_table(summary).count("no learning rate finished") == 2
    stale = [tmp_path / "lr_curves.png", tmp_path / "accuracy_vs_forgetting.png", tmp_path / "loss_curves.png"]
    for path in stale:
        path.write_bytes(b"an earlier invocation's figure")
    paths = plot(summary, records, tmp_path)  # raised "Data cannot be log-scaled"
    assert set(paths) == set(stale)
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in paths)


def test_an_accuracy_interval_stays_within_0_and_100_percent():
    from milora.comparison.summary import summarise

    def run(method, seed, accuracy):
        correct = [accuracy == 1.0] * 10
        return {"method": method, "learning_rate": 0.01, "seed": seed, "status": "done",
                "validation": {"accuracy": 0.5, "correct": []}, "test": {"accuracy": accuracy, "correct": correct},
                "forgetting_kl": 0.01 * (seed + 1), "train_seconds": 1.0, "trainable_parameters": 10,
                "loss_history": [], "adapter_dir": "/x"}

    summary = summarise([run("lora", 0, 0.0), run("lora", 1, 1.0)], ["lora"], "lora")
    low, high = summary["methods"][0]["test_accuracy_ci95"]  # unclipped: 0.5 -/+ 6.35
    assert (low, high) == (0.0, 1.0)
    assert summary["methods"][0]["forgetting_kl_ci95"][0] == 0.0
    assert any("clipped to the possible values" in sentence for sentence in summary["statistics"])
