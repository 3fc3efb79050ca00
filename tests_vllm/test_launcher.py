"""`emoreason serve --backend vllm`: the vllm serve command (checked by vLLM's own parser), health wait, errors."""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, needs_vllm

STUB = REPO / "tests_vllm" / "openai_stub.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_adapter(folder: Path, rank: int = 8, modules_to_save=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": "model\\.language_model\\..*",
         "modules_to_save": modules_to_save}))
    return folder


def launcher_args(model: Path, **overrides) -> argparse.Namespace:
    from emoreason.serve.vllm_launcher import add_vllm_arguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--allowed-audio-root", default=None)
    add_vllm_arguments(parser)
    args = parser.parse_args(["--model", str(model)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def fake_vllm(folder: Path, script: str) -> Path:
    path = folder / "vllm"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@needs_vllm
def test_command_is_accepted_by_vllm_serve(tiny_checkpoint, tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from emoreason.serve.vllm_launcher import build_vllm_command

    adapters = [f"calm={write_adapter(tmp_path / 'calm', 8)}", f"tense={write_adapter(tmp_path / 'tense', 16)}"]
    args = launcher_args(tiny_checkpoint, lora=adapters, max_audios_per_prompt=2, tensor_parallel_size=2,
                         allowed_audio_root=str(tmp_path), served_model_name="emo", dtype="bfloat16",
                         vllm_arg=["--enforce-eager"])
    command = build_vllm_command(args)
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    parsed = parser.parse_args(command[1:])
    validate_parsed_serve_args(parsed)
    assert parsed.model_tag == str(tiny_checkpoint) and parsed.port == 8000 and parsed.host == "127.0.0.1"
    assert parsed.served_model_name == ["emo"]
    assert parsed.chat_template == str(tiny_checkpoint / "chat_template.jinja")
    assert {(m.name, m.path) for m in parsed.lora_modules} == {("calm", str(tmp_path / "calm")),
                                                                 ("tense", str(tmp_path / "tense"))}
    parsed.model = parsed.model_tag  # what `vllm serve` itself does before building the engine args
    engine = AsyncEngineArgs.from_cli_args(parsed)
    assert engine.limit_mm_per_prompt == {"audio": 2}
    assert engine.enable_lora and engine.max_lora_rank == 16 and engine.max_loras == 2
    assert engine.tensor_parallel_size == 2 and engine.dtype == "bfloat16" and engine.enforce_eager
    assert engine.allowed_local_media_path == str(tmp_path.resolve())
    assert not engine.trust_remote_code


def test_adapter_that_trained_the_projector_is_refused(tiny_checkpoint, tmp_path, capsys):
    from emoreason.serve.vllm_launcher import launch

    adapter = write_adapter(tmp_path / "sft", modules_to_save=["projector"])
    args = launcher_args(tiny_checkpoint, lora=[f"sft={adapter}"], vllm_bin=str(fake_vllm(tmp_path, "exit 0")))
    assert launch(args) == 2
    assert "emoreason export" in capsys.readouterr().err


def test_without_vllm_it_says_so_and_names_the_install_command(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Through the real CLI, as a user of the training environment would run it."""
    from emoreason import cli
    from emoreason.serve import vllm_launcher

    monkeypatch.setattr(vllm_launcher.shutil, "which", lambda name: None)
    monkeypatch.setattr(vllm_launcher.sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setattr(vllm_launcher, "DEFAULT_VENV_BIN", tmp_path / "no-venv" / "vllm")
    monkeypatch.delenv("EMOREASON_VLLM_BIN", raising=False)
    assert cli.main(["serve", "--backend", "vllm", "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed in this environment" in err
    assert ".venv-vllm/bin/pip install -r requirements-vllm.txt" in err
    assert ".venv-vllm/bin/pip install --no-deps -e ." in err
    assert "vllm[audio]==0.32.0" in (REPO / "requirements-vllm.txt").read_text()


def test_vllm_exiting_before_health_is_reported(tiny_checkpoint, tmp_path, capsys):
    from emoreason.serve.vllm_launcher import launch

    args = launcher_args(tiny_checkpoint, vllm_bin=str(fake_vllm(tmp_path, "exit 3")), port=free_port(),
                         health_timeout=30)
    assert launch(args) == 3
    captured = capsys.readouterr()
    assert "serve " + str(tiny_checkpoint) in captured.out  # the command is printed before it runs
    assert "exited with code 3 before it was healthy" in captured.err


def test_launcher_waits_for_health_then_smoke_test_passes(tiny_checkpoint, tmp_path):
    """The launcher starts a stand-in `vllm` (same CLI, vLLM's request validation), waits for /health, and the
    smoke script's checks pass against it."""
    port = free_port()
    vllm_bin = fake_vllm(tmp_path, f'exec "{sys.executable}" "{STUB}" "$@"')
    launcher = subprocess.Popen(
        [sys.executable, "-m", "emoreason.serve.vllm_launcher", "--model", str(tiny_checkpoint), "--port", str(port),
         "--vllm-bin", str(vllm_bin), "--health-timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in launcher.stdout:
            lines.append(line)
            if "healthy at" in line:
                break
        assert any(f"http://127.0.0.1:{port}/v1" in line for line in lines), "".join(lines)
        smoke = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "vllm_smoke.py"), "--base-url", f"http://127.0.0.1:{port}/v1",
             "--checkpoint", str(tiny_checkpoint), "--report", str(tmp_path / "smoke.json"), "--concurrency", "4"],
            capture_output=True, text=True, timeout=300)
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        report = json.loads((tmp_path / "smoke.json").read_text())
        assert report["failed"] == [] and report["passed"] == 7
        # SIGTERM to the launcher (a scheduler stopping the job) stops the server it started: nothing is left
        # holding the port.
        launcher.terminate()
        assert launcher.wait(timeout=60) == 128 + 15
        assert not port_answers(port, within=15)
    finally:
        launcher.terminate()
        launcher.wait(timeout=60)


def port_answers(port: int, within: float) -> bool:
    """True if something still accepts connections on ``port`` at the end of ``within`` seconds."""
    import time

    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.5)


@pytest.mark.parametrize("fault,check", [("ignore_audio", "audio_tokens"), ("ignore_seed", "seed")])
def test_smoke_script_catches_a_broken_server(tiny_checkpoint, tmp_path, fault, check):
    port = free_port()
    stub = subprocess.Popen([sys.executable, str(STUB), "serve", str(tiny_checkpoint), "--port", str(port)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "EMOREASON_STUB_FAULT": fault, "EMOREASON_STUB_VALIDATE": "0"})
    try:
        assert "stub serving" in stub.stdout.readline()
        smoke = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "vllm_smoke.py"), "--base-url", f"http://127.0.0.1:{port}/v1",
             "--checkpoint", str(tiny_checkpoint), "--report", str(tmp_path / "smoke.json"), "--concurrency", "2"],
            capture_output=True, text=True, timeout=300)
        assert smoke.returncode == 1
        assert json.loads((tmp_path / "smoke.json").read_text())["failed"] == [check]
    finally:
        stub.terminate()
        stub.wait(timeout=60)


def test_dry_run_prints_the_command_and_starts_nothing(tiny_checkpoint, tmp_path, capsys):
    from emoreason.serve.vllm_launcher import launch

    marker = tmp_path / "started"
    args = launcher_args(tiny_checkpoint, dry_run=True, vllm_bin=str(fake_vllm(tmp_path, f"touch {marker}")))
    assert launch(args) == 0
    assert f"serve {tiny_checkpoint}" in capsys.readouterr().out and not marker.exists()


def docs_vllm_serve_line() -> str:
    lines = [line for line in (REPO / "docs" / "vllm.md").read_text().splitlines() if line.startswith("vllm serve ")]
    assert len(lines) == 1
    return lines[0]


def test_docs_command_is_what_the_launcher_prints(tmp_path, monkeypatch):
    import shlex

    from emoreason.serve.vllm_launcher import build_vllm_command

    checkpoint = tmp_path / "runs" / "sft" / "merged"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "chat_template.jinja").write_text("{{ messages }}")
    monkeypatch.chdir(tmp_path)
    assert shlex.join(build_vllm_command(launcher_args(Path("runs/sft/merged")))) == docs_vllm_serve_line()


@needs_vllm
def test_docs_command_is_accepted_by_vllm_serve():
    import shlex

    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    parsed = parser.parse_args(shlex.split(docs_vllm_serve_line())[1:])
    assert parsed.model_tag == "runs/sft/merged" and parsed.limit_mm_per_prompt == {"audio": 1}


def test_api_key_travels_in_the_environment_not_the_command(tiny_checkpoint, monkeypatch):
    from emoreason.serve.vllm_launcher import build_vllm_command, vllm_environment

    monkeypatch.setenv("VLLM_PLUGINS", "other")
    args = launcher_args(tiny_checkpoint, api_key="s3cret")
    assert not any("s3cret" in part for part in build_vllm_command(args))
    env = vllm_environment(args)
    assert env["VLLM_API_KEY"] == "s3cret" and env["VLLM_PLUGINS"] == "other,emoreason"


@pytest.mark.parametrize("size,ok", [(1, True), (2, True), (4, True), (28, True), (8, False), (7, False), (3, False)])
def test_tensor_parallel_size_must_split_the_heads(tmp_path, capsys, size, ok):
    """Qwen2.5-7B's shape (28 attention heads, 4 KV heads): 8 GPUs cannot split it; the launcher says so before vLLM
    starts, naming the sizes that work."""
    from emoreason.serve.vllm_launcher import launch

    checkpoint = tmp_path / "qwen7b-like"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(
        {"model_type": "emoreason", "text_config": {"num_attention_heads": 28, "num_key_value_heads": 4}}))
    marker = tmp_path / "started"
    args = launcher_args(checkpoint, tensor_parallel_size=size, dry_run=True,
                         vllm_bin=str(fake_vllm(tmp_path, f"touch {marker}")))
    assert launch(args) == (0 if ok else 2)
    err = capsys.readouterr().err
    if ok:
        assert err == ""
    else:
        assert f"--tensor-parallel-size {size} cannot split the language model: it has 28 attention heads and 4 KV " \
               "heads" in err and "valid sizes: 1, 2, 4, 28" in err
    assert not marker.exists()


@pytest.mark.parametrize("stop_with", ["SIGINT", "SIGTERM"])
def test_a_vllm_that_ignores_the_stop_signal_is_killed_with_everything_it_started(tiny_checkpoint, tmp_path,
                                                                                   stop_with):
    """Ctrl-C or SIGTERM to the launcher stops vLLM within ``--stop-timeout`` steps even when vLLM ignores both
    signals, and takes its own children with it (an engine core left behind holds GBs of memory and the port)."""
    import signal
    import time

    child_pid = tmp_path / "child.pid"
    # A stand-in vLLM that never becomes healthy, ignores SIGINT/SIGTERM, and starts a child of its own.
    vllm_bin = fake_vllm(tmp_path, f"trap '' INT TERM\nsleep 300 &\necho $! > {child_pid}\n"
                                   "while true; do sleep 1; done")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "emoreason.serve.vllm_launcher", "--model", str(tiny_checkpoint), "--port",
         str(free_port()), "--vllm-bin", str(vllm_bin), "--health-timeout", "120", "--stop-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while not child_pid.exists() or not child_pid.read_text().strip():
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.stdout.read()
            time.sleep(0.2)
        pid = int(child_pid.read_text())
        os.kill(pid, 0)  # the grandchild runs
        started = time.monotonic()
        launcher.send_signal(getattr(signal, stop_with))
        launcher.wait(timeout=30)
        assert time.monotonic() - started < 15  # SIGINT/SIGTERM, 2 s each, then SIGKILL: never waits forever
        assert "escalating" in launcher.stdout.read()
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, f"vLLM's child {pid} outlived the launcher"
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie (exited, not yet reaped by init) counts as gone
            return fh.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False
