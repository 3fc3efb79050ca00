"""The dual-encoder audio LLM: config / model / processor, registered with the transformers Auto classes."""

from __future__ import annotations

import os

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from ..data.audio_tokens import DEFAULT_STACK_FACTOR, num_audio_tokens, num_audio_tokens_for_duration
from .audio_encoder import EmoReasonAudioEncoder, EmoReasonProjector
from .configuration_emoreason import EmoReasonConfig
from .loading import SAFE_LOAD_KWARGS, safe_load_kwargs
from .modeling_emoreason import (
    AudioPlaceholderError,
    EmoReasonForConditionalGeneration,
    EmoReasonModel,
    EmoReasonPreTrainedModel,
)
from .processing_emoreason import AUDIO_TOKEN, EmoReasonProcessor

AutoConfig.register("emoreason", EmoReasonConfig, exist_ok=True)
AutoModel.register(EmoReasonConfig, EmoReasonModel, exist_ok=True)
AutoModelForCausalLM.register(EmoReasonConfig, EmoReasonForConditionalGeneration, exist_ok=True)
AutoProcessor.register(EmoReasonConfig, EmoReasonProcessor, exist_ok=True)


def build_from_components(
    content_encoder: str | os.PathLike,
    paralinguistic_encoder: str | os.PathLike,
    language_model: str | os.PathLike,
    stack_factor: int = DEFAULT_STACK_FACTOR,
    processor: EmoReasonProcessor | None = None,
    **model_kwargs,
) -> tuple[EmoReasonForConditionalGeneration, EmoReasonProcessor]:
    """Assemble model and processor from three pretrained checkpoints (hub ids or local folders).

    The tokenizer gains the `<audio>` token (embeddings resized to match) and a chat template; the projector is new.
    A ``processor`` already built from the same parts (``EmoReasonProcessor.from_components``) is used as it is.
    """
    if processor is None:
        processor = EmoReasonProcessor.from_components(
            content_encoder, paralinguistic_encoder, language_model, stack_factor=stack_factor
        )
    elif processor.stack_factor != stack_factor:
        raise ValueError(f"the processor's stack_factor {processor.stack_factor} differs from the model's "
                         f"{stack_factor}")
    model = EmoReasonForConditionalGeneration.from_components(
        content_encoder,
        paralinguistic_encoder,
        language_model,
        audio_token_id=processor.audio_token_id,
        vocab_size=len(processor.tokenizer),
        stack_factor=stack_factor,
        **model_kwargs,
    )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def text_only_lm(model: EmoReasonForConditionalGeneration):
    """A plain causal LM (the ``text_config``'s class) over the composite's own language model and LM head.

    Nothing is copied: the shell's modules are the composite's, so generating with it is text-only generation with the
    backbone (the self teacher), and training it trains the composite's LLM (the teacher warm-up), leaving the towers
    and the projector untouched. The shell's own parameters are created on the meta device and replaced at once."""
    import torch

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model.config.text_config)
    setattr(lm, lm.base_model_prefix, model.model.language_model)
    lm.set_output_embeddings(model.lm_head)
    lm.generation_config = model.generation_config
    return lm


def load_pretrained(path: str | os.PathLike, **kwargs) -> tuple[EmoReasonForConditionalGeneration, EmoReasonProcessor]:
    """Load a saved EmoReason checkpoint and its processor (safetensors only, no remote code)."""
    model = EmoReasonForConditionalGeneration.from_pretrained(path, **safe_load_kwargs(**kwargs))
    processor = EmoReasonProcessor.from_pretrained(path)
    return model, processor


__all__ = [
    "AUDIO_TOKEN",
    "SAFE_LOAD_KWARGS",
    "AudioPlaceholderError",
    "EmoReasonAudioEncoder",
    "EmoReasonConfig",
    "EmoReasonForConditionalGeneration",
    "EmoReasonModel",
    "EmoReasonPreTrainedModel",
    "EmoReasonProcessor",
    "EmoReasonProjector",
    "build_from_components",
    "load_pretrained",
    "num_audio_tokens",
    "num_audio_tokens_for_duration",
    "safe_load_kwargs",
]
