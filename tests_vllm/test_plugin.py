"""The plugin registers through vLLM's own entry-point loading, lazily and re-entrantly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import needs_vllm

pytestmark = needs_vllm

# Runs in a fresh interpreter: what registration imports must be measured before anything else imports it.
PROBE = r"""
import json, sys
from importlib.metadata import entry_points
ours = [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "emoreason"]
from vllm.plugins import load_general_plugins
from vllm import ModelRegistry
load_general_plugins()
from emoreason.serve import vllm_plugin
vllm_plugin.register()  # a second time, as vLLM does in each process it starts
heavy = sorted(m for m in sys.modules if m.startswith(("emoreason.modeling", "emoreason.serve.vllm_model"))
               or m in ("vllm.model_executor.models.qwen2", "transformers.models.whisper.modeling_whisper"))
from vllm.transformers_utils.config import _CONFIG_REGISTRY
print(json.dumps({
    "entry_point": ours,
    "heavy_after_register": heavy,
    "archs": [a for a in ModelRegistry.get_supported_archs() if a.startswith("EmoReason")],
    "config_class": _CONFIG_REGISTRY["emoreason"].__name__,
}))
"""


def test_plugin_registers_lazily_through_the_entry_point():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["entry_point"] == ["emoreason.serve.vllm_plugin:register"]
    assert report["archs"] == ["EmoReasonForConditionalGeneration"]
    # Nothing of the model is imported at registration; resolving the config class (last line) is what imports it.
    assert report["heavy_after_register"] == []
    assert report["config_class"] == "EmoReasonConfig"


def test_model_config_resolves_our_architecture(model_config, tiny_checkpoint):
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora, supports_multimodal

    from emoreason.modeling.configuration_emoreason import EmoReasonConfig
    from emoreason.serve.vllm_model import EmoReasonForConditionalGeneration

    assert isinstance(model_config.hf_config, EmoReasonConfig)
    assert model_config.is_multimodal_model
    saved = json.loads((tiny_checkpoint / "config.json").read_text())
    assert model_config.get_vocab_size() == saved["text_config"]["vocab_size"]
    assert model_config.get_hidden_size() == saved["text_config"]["hidden_size"]
    model_cls, arch = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
    assert arch == "EmoReasonForConditionalGeneration" and model_cls is EmoReasonForConditionalGeneration
    assert supports_multimodal(model_cls) and supports_lora(model_cls)
    assert model_cls.get_placeholder_str("audio", 0) == "<audio>"


def test_unreadable_audio_becomes_a_client_error_in_vllms_loader():
    """vLLM answers a soundfile error with a 500; after registration its loader raises ValueError (a 400) with the
    reason. A readable clip still loads, and registering again does not wrap twice."""
    import io

    import numpy as np
    import soundfile as sf
    from vllm.multimodal.media import audio as vllm_audio

    from emoreason.serve import vllm_plugin

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(1600, dtype=np.float32), 16_000, format="WAV")
    good = buffer.getvalue()
    vllm_plugin.register()
    wrapped = vllm_audio.load_audio
    vllm_plugin.register()
    assert vllm_audio.load_audio is wrapped and wrapped._emoreason_wrapped
    with pytest.raises(ValueError, match="unreadable audio: .*data"):
        vllm_audio.load_audio(io.BytesIO(good[:30]), sr=None)
    samples, rate = vllm_audio.load_audio(io.BytesIO(good), sr=None)
    assert rate == 16_000 and len(samples) == 1600
