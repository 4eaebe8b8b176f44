"""`RunLock`: of N processes taking over one stale lock at once, exactly one holds it."""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
import time

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
