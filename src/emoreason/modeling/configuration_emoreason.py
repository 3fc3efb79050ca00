"""EmoReason configuration: content encoder (Whisper) + paralinguistic encoder (WavLM/HuBERT/wav2vec2) + causal LM."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig

from ..data.audio_tokens import DEFAULT_STACK_FACTOR
from .fusion import get_fusion

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.20 (the version vLLM pins): sub-configs are resolved in __post_init__
    SubConfigSpec = None

FEATURE_NORMS = ("global_mvn", "none")
DEFAULT_SUB_CONFIG_TYPES = {"content_config": "whisper", "paralinguistic_config": "wavlm", "text_config": "qwen2"}
PARALINGUISTIC_TYPES = ("wavlm", "hubert", "wav2vec2", "data2vec-audio", "unispeech-sat")


@strict
class EmoReasonConfig(PreTrainedConfig):
    r"""
    content_config: config of a Whisper model; only its encoder is built (what the words are).
    paralinguistic_config: config of a self-supervised speech model (how they are said).
    text_config: config of any causal language model (Qwen2, Llama, Gemma, ...).
    stack_factor: encoder frames (50 Hz) stacked into one audio token; 4 gives 12.5 tokens per second.
    fusion: how the two towers combine per frame, a name in emoreason.modeling.fusion.FUSION_MODES: "concat", "sum"
        (both projected then added) or "gated".
    projector_hidden_size: width of the projector MLP (0: the language model's hidden size).
    feature_norm: "global_mvn" (default) standardises each tower output dimension with a mean and standard deviation
        measured on training clips before SFT (as ESPnet's GlobalMVN does for input features; statistics live in the
        projector's buffers, identity until measured), or "none".
    paralinguistic_weighted_layers: learn a softmax-weighted sum over all layers of the paralinguistic encoder (the
        usual practice for emotion probing of SSL models, since prosody lives in middle layers); else use the last.
    audio_token_id: id of the `<audio>` placeholder token in the tokenizer.
    train_content_encoder / train_paralinguistic_encoder: unfreeze a tower (frozen towers stay in eval mode).
    max_audio_seconds: longest clip the content encoder's position table holds (Whisper: 30 s).
    """

    model_type = "emoreason"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            key: SubConfigSpec(config_class=AutoConfig, model_type=default)
            for key, default in DEFAULT_SUB_CONFIG_TYPES.items()
        }
    else:
        sub_configs = {key: AutoConfig for key in DEFAULT_SUB_CONFIG_TYPES}

    content_config: dict | PreTrainedConfig | None = None
    paralinguistic_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    stack_factor: int = DEFAULT_STACK_FACTOR
    fusion: str = "concat"  # a key of FUSION_MODES (a registry, so not a Literal)
    projector_hidden_size: int = 0
    projector_hidden_act: str = "gelu"
    feature_norm: Literal["global_mvn", "none"] = "global_mvn"
    paralinguistic_weighted_layers: bool = True
    audio_token_id: int = 0
    train_content_encoder: bool = False
    train_paralinguistic_encoder: bool = False
    # Remote code is never needed to load this model; an empty map keeps save/load on the local classes.
    auto_map: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:
            for key, default in DEFAULT_SUB_CONFIG_TYPES.items():
                setattr(self, key, _as_sub_config(getattr(self, key), default))
        super().__post_init__(**kwargs)
        if self.auto_map is None:
            self.auto_map = {}
        get_fusion(self.fusion)  # raises with the known modes
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        if self.stack_factor < 1:
            raise ValueError(f"stack_factor must be >= 1, got {self.stack_factor}")
        if self.content_config.model_type != "whisper":
            raise ValueError(f"content_config must be a Whisper config, got {self.content_config.model_type!r}")
        if self.paralinguistic_config.model_type not in PARALINGUISTIC_TYPES:
            raise ValueError(
                f"paralinguistic_config.model_type must be one of {PARALINGUISTIC_TYPES}, "
                f"got {self.paralinguistic_config.model_type!r}"
            )
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = self.text_config.tie_word_embeddings

    @property
    def max_audio_seconds(self) -> float:
        # Whisper: max_source_positions encoder frames at 50 Hz (two mel frames of 10 ms each)
        return self.content_config.max_source_positions * 2 * 0.01


def _as_sub_config(value, default_model_type: str) -> PreTrainedConfig:
    """dict / None -> config object, for transformers versions without ``SubConfigSpec``."""
    from transformers import CONFIG_MAPPING

    if isinstance(value, PreTrainedConfig):
        return value
    value = dict(value or {})
    return CONFIG_MAPPING[value.pop("model_type", default_model_type)](**value)


__all__ = ["EmoReasonConfig"]
