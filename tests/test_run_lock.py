"""`RunLock`: of N processes taking over one stale lock at once, exactly one holds it; another host's lock is kept."""

from __future__ import annotations

import json
import multiprocessing
import re
import socket
import subprocess
import sys
import time

import pytest

import milora.io
from milora.errors import OutputError
from milora.io import LOCK_FILE, RunLock


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _slow_alive(pid: int) -> bool:
    alive = _ORIGINAL_ALIVE(pid)
    time.sleep(0.3)  # widen the window between reading the lock and taking it over
    return alive


_ORIGINAL_ALIVE = milora.io._process_alive


def _take(directory: str, start, done, results) -> None:
    milora.io._process_alive = _slow_alive
    start.wait()
    try:
        RunLock(directory).acquire()
        results.put("won")
        done.wait(60)  # hold it (alive) until the others have decided
    except OutputError:
        results.put("refused")


def test_exactly_one_of_six_takers_of_a_stale_lock_wins(tmp_path):
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "since": 0.0, "purpose": "a dead run"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    context = multiprocessing.get_context("fork")
    start, done, results = context.Event(), context.Event(), context.Queue()
    takers = [context.Process(target=_take, args=(str(tmp_path), start, done, results)) for _ in range(6)]
    for taker in takers:
        taker.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in takers]
    done.set()
    for taker in takers:
        taker.join()
    assert outcomes.count("won") == 1, outcomes


def test_a_lock_of_another_host_is_respected_even_with_a_dead_pid(tmp_path, tiny):
    """docs/reliability.md: "one from another host is respected": its pid means nothing here, so a pid that
    is dead on this host does not make it stale; train refuses the directory, names the holder and writes nothing."""
    from milora.training.run import train

    from conftest import run_config

    out = tmp_path / "run"
    out.mkdir()
    foreign = {"host": socket.gethostname() + "-elsewhere", "pid": _dead_pid(), "since": 0.0, "purpose": "milora train"}
    (out / LOCK_FILE).write_text(json.dumps(foreign))
    lock_bytes = (out / LOCK_FILE).read_bytes()
    message = rf"in use by milora train, pid {foreign['pid']} on {re.escape(foreign['host'])}.* remove .*{LOCK_FILE}"
    with pytest.raises(OutputError, match=message):
        RunLock(out).acquire()
    with pytest.raises(OutputError, match=message):
        train(run_config(tiny, out, max_steps=1))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE] and (out / LOCK_FILE).read_bytes() == lock_bytes
    (out / LOCK_FILE).unlink()  # removed by hand once that run is gone: the directory is usable again
    assert (train(run_config(tiny, out, max_steps=1)).adapter_dir / "milora_config.json").is_file()
