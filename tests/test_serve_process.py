"""The loopback launcher of the built-in server (:mod:`emoreason.testing.server`), with a stand-in for ``python -m
emoreason.cli serve`` (a few lines of http.server) so that starting, health, failures and stopping take seconds."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from emoreason.testing.server import ServeProcess, ServerFailed, stop_all

# Run as `<python> -m emoreason.cli serve --model M ... --port P ...`: reads the port, then behaves as MODE says.
STAND_IN = textwrap.dedent("""
    import os, signal, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    mode = os.environ["MODE"]
    print("stand-in got", " ".join(args), "key", os.environ.get("EMOREASON_API_KEY"), flush=True)
    if mode == "crash":
        print("Traceback: the model folder has no config.json", flush=True)
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class Health(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            self.send_response(200 if mode != "sick" else 503)
            self.end_headers()
    if mode == "slow":
        time.sleep(1.0)
    HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")


@pytest.fixture
def python(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {script} \"$@\"\n")  # drops `-m emoreason.cli`
    wrapper.chmod(0o755)
    return str(wrapper)


def serve(python, tmp_path, mode, **kwargs) -> ServeProcess:
    env = {**os.environ, "MODE": mode}
    return ServeProcess(tmp_path / "model", "tiny", log=tmp_path / f"{mode}.log", python=python, env=env, **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_starts_on_loopback_waits_for_health_and_stops(python, tmp_path):
    with serve(python, tmp_path, "slow", api_key="sk-local") as server:
        assert server.healthy() and server.url == f"http://127.0.0.1:{server.port}/v1"
        pid = server.proc.pid
    assert server.proc.returncode is not None and not _alive(pid)
    log = (tmp_path / "slow.log").read_text()
    assert "serve --model" in log and "--host 127.0.0.1" in log and "--num-threads 1" in log
    assert "key sk-local" in log and "sk-local" not in " ".join(server.command)  # the key never on the command line


def test_a_server_that_exits_fails_with_its_log_tail(python, tmp_path):
    server = serve(python, tmp_path, "crash")
    with pytest.raises(ServerFailed, match=r"(?s)exited with status 3.*no config.json"):
        server.start()


def test_a_server_that_never_gets_healthy_times_out_with_its_log_and_is_stopped(python, tmp_path):
    server = serve(python, tmp_path, "sick", health_timeout=1.0)
    with pytest.raises(ServerFailed, match=r"(?s)not healthy in 1 s.*stand-in got"):
        server.start()
    assert server.proc.returncode is not None


def test_a_server_that_ignores_sigterm_is_killed(python, tmp_path):
    servers = [serve(python, tmp_path, "stubborn", stop_timeout=0.5).launch() for _ in range(2)]
    for server in servers:
        server.wait_healthy()
    start = time.monotonic()
    stop_all(servers)
    assert all(s.proc.returncode == -9 for s in servers) and time.monotonic() - start < 5
