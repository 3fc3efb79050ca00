"""LoRA on the language model only; the projector trains in full and is saved with the adapter.

Encoders are frozen by default (``train_*_encoder`` in the config unfreezes them). The LoRA targets are a regex anchored
at ``model.language_model``, so a Whisper or WavLM projection that happens to be called ``q_proj`` is never adapted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT matches modules_to_save by name suffix: "projector" is model.audio_encoder.projector.
TRAINABLE_AUDIO_MODULES = ("projector",)


def language_model_target_regex(target_modules: Sequence[str] | str | None = None) -> str:
    if isinstance(target_modules, str) and target_modules not in ("all-linear",):
        return target_modules  # already a regex
    names = DEFAULT_TARGETS if target_modules in (None, "all-linear") else tuple(target_modules)
    return r"model\.language_model\..*\.(" + "|".join(re.escape(n) for n in names) + r")"


def language_model_lora_config(
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = TRAINABLE_AUDIO_MODULES,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=language_model_target_regex(target_modules),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias="none",
        use_rslora=use_rslora,
        use_dora=use_dora,
    )


def apply_lora(model, config: LoraConfig | None = None, **kwargs) -> PeftModel:
    """Wrap ``model`` with LoRA adapters on its language model (+ trainable projector)."""
    return get_peft_model(model, config or language_model_lora_config(**kwargs))
