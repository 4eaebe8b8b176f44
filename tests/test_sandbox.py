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
