"""Live servers for the API tests: real HTTP, real engine, real store.

- `InThreadServer`: uvicorn running on the shared engine's event loop (tests/engine_host.py),
  so API tests reuse the one engine the session started.
- `ServerProcess`: `deltamem serve` in its own process (its own engine), for restart and
  multi-replica tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InThreadServer:
    def __init__(self, host, settings, store=None):
        import uvicorn

        from server.app import create_app

        self.host = host
        self.settings = settings
        self.port = settings.port
        self.app = create_app(settings, engine=host.engine, store=store)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self._future = asyncio.run_coroutine_threadsafe(self.server.serve(), host.loop)
        deadline = time.time() + 60
        while not self.server.started:
            if self._future.done():
                self._future.result()  # raises the start-up error
            if time.time() > deadline:
                raise RuntimeError("in-thread server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._future.result(timeout=30)


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None, log_path: Path | None = None):
        self.port = free_port()
        # Eager: these replicas test sessions across processes, and a compiled start costs a
        # minute more; the compiled engine is tested on the shared one.
        self.args = ["--port", str(self.port), "--enforce-eager", *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> ServerProcess:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "deltamem.cli", "serve", *self.args],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
