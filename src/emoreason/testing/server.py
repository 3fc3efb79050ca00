"""The built-in server (``emoreason serve``) as a subprocess on a free loopback port: the demo's evaluation stage, the
recipe chain's judge and evaluated model, and the replica benchmark start it here.

``with ServeProcess(model, name, log=path) as server: server.url`` starts ``python -m emoreason.cli serve`` on
127.0.0.1 (its own process group, one torch thread by default), waits until ``/health`` answers 200, and stops it on
exit whatever happens: SIGTERM to the group (a background shell starts children with SIGINT ignored), then SIGKILL
after ``stop_timeout``. A server that exits or does not become healthy in ``health_timeout`` raises
:class:`ServerFailed` with the tail of its log, and is stopped. A key (``api_key``) reaches the server through
``$EMOREASON_API_KEY``, never on its command line.

By command line on purpose: ``testing`` sits beside ``serve`` and does not import it.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ServerFailed(RuntimeError):
    """The server exited, or did not answer /health in time; the message carries the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "".join(text.splitlines(keepends=True)[-lines:])


class ServeProcess:
    """``emoreason serve`` on loopback, started with :meth:`start` (or ``with``) and stopped with :meth:`stop`."""

    def __init__(self, model: str | Path, name: str, *, log: str | Path, python: str = sys.executable,
                 cwd: str | Path | None = None, env: dict[str, str] | None = None, api_key: str | None = None,
                 num_threads: int | None = 1, extra_args: Sequence[str] = (), health_timeout: float = 240.0,
                 stop_timeout: float = 30.0, port: int | None = None):
        self.model, self.name = model, name
        self.log = Path(log)
        self.port = port or free_port()
        self.cwd = cwd
        self.env = dict(os.environ if env is None else env)
        if api_key:
            self.env["EMOREASON_API_KEY"] = api_key
        self.health_timeout, self.stop_timeout = health_timeout, stop_timeout
        self.command = [python, "-m", "emoreason.cli", "serve", "--model", str(model), "--served-model-name", name,
                        "--host", LOOPBACK, "--port", str(self.port),
                        *(["--num-threads", str(num_threads)] if num_threads else []), *map(str, extra_args)]
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL (``.../v1``)."""
        return f"{self.base}/v1"

    def launch(self) -> ServeProcess:
        """Start the process without waiting (start several, then :meth:`wait_healthy` on each)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(self.command)}\n")
            fh.flush()
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float | None = None, poll: float = 0.5) -> ServeProcess:
        """Until /health answers 200; raises :class:`ServerFailed` (and stops the server) if it exits or times out."""
        assert self.proc is not None, "launch() first"
        timeout = self.health_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerFailed(f"serve {self.name} exited with status {self.proc.returncode}; log {self.log}:\n"
                                   f"{log_tail(self.log)}")
            if self.healthy():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"serve {self.name}: not healthy in {timeout:.0f} s; log {self.log}:\n"
                                   f"{log_tail(self.log)}")
            time.sleep(poll)

    def start(self) -> ServeProcess:
        return self.launch().wait_healthy()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``stop_timeout``; idempotent."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # gone between the check and the signal
        pass


def stop_all(servers: Sequence[ServeProcess]) -> None:
    """Stop several servers: SIGTERM to all first, so their shutdowns overlap."""
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            _signal_group(server.proc, signal.SIGTERM)
    for server in servers:
        server.stop()
