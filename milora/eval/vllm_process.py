"""A local vLLM server as a context manager: started in its own process, ready when ``/v1/models``
answers, stopped on exit. For tests, benchmarks and sweeps on one machine; the vLLM environment is
the caller's (``make vllm-env`` builds one: vLLM pins other versions than milora, so it lives in its
own venv and runs as a separate program)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from milora.adapter.serving import VLLM_MODULE, read_served_adapter, vllm_arguments
from milora.errors import ServerError
from milora.eval.server import Retry, ServedEntry, list_models

_LOG_TAIL = 3000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class VllmServer:
    """``python``: the vLLM environment's interpreter; ``model``: the base (a directory or hub id);
    ``adapters``: served name -> adapter directory; ``extra``: more server arguments (``--dtype float32``,
    ``--max-model-len 2048``, ...); ``env``: environment additions (``VLLM_CPU_KVCACHE_SPACE``: GiB of
    KV cache on CPU); the server's output goes to ``log``. ``started_s``: seconds until it answered."""

    python: str
    model: str
    log: Path
    adapters: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    ready_timeout_s: float = 1800.0
    started_s: float | None = None
    models: list[ServedEntry] = field(default_factory=list)
    _process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        served = []
        for name, directory in self.adapters.items():
            adapter = read_served_adapter(directory)
            served.append(type(adapter)(adapter.directory, adapter.rank, adapter.base, name))
        arguments = (vllm_arguments(served, self.model, self.port) if served
                     else ["--model", self.model, "--port", str(self.port)])
        return [self.python, *VLLM_MODULE, *arguments, "--host", "127.0.0.1", *self.extra]

    def __enter__(self) -> VllmServer:
        if not Path(self.python).is_file():
            raise ServerError(f"{self.python} does not exist: build the vLLM environment with `make vllm-env`.")
        self.port = self.port or free_port()
        command = self.command()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(self.log, "w") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, **self.env})
        try:
            self._wait(started)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, started: float) -> None:
        while time.perf_counter() - started < self.ready_timeout_s:
            if self._process.poll() is not None:
                raise ServerError(f"vLLM exited with status {self._process.returncode} before answering; the end of "
                                  f"its log ({self.log}):\n{self.log.read_text(errors='replace')[-_LOG_TAIL:]}")
            try:
                self.models = list_models(self.url, Retry(attempts=1, timeout_s=5.0))
            except ServerError:
                time.sleep(1.0)
                continue
            self.started_s = time.perf_counter() - started
            return
        raise ServerError(f"vLLM did not answer within {self.ready_timeout_s:.0f} s (log: {self.log}).")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
