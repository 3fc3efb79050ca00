"""vLLM plugin: teaches `vllm serve <checkpoint>` our dual-encoder architecture.

Declared as the ``vllm.general_plugins`` entry point ``emoreason`` (pyproject.toml), so vLLM calls :func:`register` in
every process it starts (API server, engine core, workers), possibly several times. Registration is lazy: it names the
model class and the config class as ``"module:Class"`` strings, so nothing of ours (no model code, no transformers
model classes) is imported until vLLM actually loads an ``emoreason`` checkpoint, and registering twice is a no-op.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "EmoReasonForConditionalGeneration"
MODEL_CLASS = "emoreason.serve.vllm_model:EmoReasonForConditionalGeneration"
MODEL_TYPE = "emoreason"
CONFIG_CLASS_NAME = "EmoReasonConfig"
CONFIG_MODULE = "emoreason.modeling.configuration_emoreason"


def _register_model() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def _register_config() -> None:
    """Make ``model_type: emoreason`` loadable without remote code.

    vLLM resolves model types it knows through a lazy name -> module table (the same one its own configs use); adding
    ours there keeps registration import-free. Should a vLLM release drop that table, fall back to registering the
    class with ``AutoConfig`` directly (imports our modeling package, still no vLLM model code).
    """
    try:
        from vllm.transformers_utils import config as vllm_config_utils
        from vllm.transformers_utils import configs as vllm_configs

        table = vllm_configs._CLASS_TO_MODULE
        registry = vllm_config_utils._CONFIG_REGISTRY
    except (ImportError, AttributeError):
        logger.debug("vLLM has no lazy config table; registering %s with AutoConfig", CONFIG_CLASS_NAME)
        from transformers import AutoConfig

        from emoreason.modeling.configuration_emoreason import EmoReasonConfig

        AutoConfig.register(MODEL_TYPE, EmoReasonConfig, exist_ok=True)
        return
    table.setdefault(CONFIG_CLASS_NAME, CONFIG_MODULE)
    registry.setdefault(MODEL_TYPE, CONFIG_CLASS_NAME)


def _unreadable_audio_is_a_client_error() -> None:
    """An audio part that libsndfile recognises but cannot read (a truncated WAV: "No 'data' chunk marker") reaches
    vLLM's server as ``soundfile.LibsndfileError``, which it answers with a 500, as if the server had failed. Our
    server answers 400 with the reason; so does vLLM once its loader turns that error into a ``ValueError`` (what vLLM
    itself raises for audio PyAV cannot decode). Wrapped once, whatever the number of ``register`` calls."""
    try:
        import soundfile
        from vllm.multimodal.media import audio as vllm_audio
    except ImportError:  # no audio support installed: vLLM reports that itself
        return
    load_audio = vllm_audio.load_audio
    if getattr(load_audio, "_emoreason_wrapped", False):
        return

    def load_audio_or_refuse(*args, **kwargs):
        try:
            return load_audio(*args, **kwargs)
        except soundfile.LibsndfileError as err:
            raise ValueError(f"unreadable audio: {err}") from err

    load_audio_or_refuse._emoreason_wrapped = True
    vllm_audio.load_audio = load_audio_or_refuse


def register() -> None:
    """Entry point vLLM calls (``vllm.general_plugins``). Cheap and re-entrant."""
    _register_model()
    _register_config()
    _unreadable_audio_is_a_client_error()


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "MODEL_TYPE", "register"]
