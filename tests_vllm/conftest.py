"""Fixtures for the CPU-level vLLM tests, run in vLLM's own environment (`make test-vllm`).

The tiny checkpoint is the one `make test-vllm` builds with the *training* environment (``EMOREASON_VLLM_TINY``), so
the plugin is tested on what training writes; run by hand without it, the tests build one with this environment.
vLLM's engine needs a GPU; its configs, registry, multimodal processor, request models and the model's construction
and weight loading run on CPU with ``VLLM_TARGET_DEVICE=cpu``.
"""

from __future__ import annotations

import os
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
    from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import initialize_model

    vllm_config = VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"))
    init_file = Path(tempfile.mkdtemp()) / "dist-init"
    with set_current_vllm_config(vllm_config):
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
