"""The one set of keyword arguments every ``from_pretrained`` of model weights in emoreason goes through.

- ``use_safetensors=True``: pickled ``.bin`` weights can run code when unpickled, so they are refused.
- ``trust_remote_code=False``: no Python from a checkpoint folder or the Hub is imported.
- ``use_kernels=False``: transformers >= 5.25 turns on Hub kernels by default (``USE_HUB_KERNELS`` unset), which
  downloads compiled layers from the Hub at load time (remote code by another name), and fails outright when the
  optional ``kernels`` package is missing. Off here; a GPU user who wants them passes ``use_kernels=True`` on purpose.

Callers may override ``use_kernels`` (and ``dtype``/``attn_implementation`` etc.); ``use_safetensors`` and
``trust_remote_code`` cannot be weakened through this helper.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SAFE_LOAD_KWARGS: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False, "use_kernels": False}


def safe_load_kwargs(**kwargs: Any) -> dict[str, Any]:
    """``kwargs`` plus the safe defaults; asking for pickled weights or remote code is a clear error."""
    if kwargs.get("use_safetensors", True) is not True:
        raise ValueError("emoreason loads safetensors weights only (use_safetensors=False was requested)")
    if kwargs.get("trust_remote_code", False):
        raise ValueError("emoreason never runs a checkpoint's own code (trust_remote_code=True was requested)")
    return {**SAFE_LOAD_KWARGS, **kwargs}


# -- attention implementation per part -------------------------------------------------------------------------
# The composite holds three models from different families, and not every family has every attention kernel (WavLM
# has neither SDPA nor flash attention; Whisper, HuBERT and the LLMs have both). A recipe names one implementation
# (``attn_implementation: sdpa``); each part gets it where its class supports it and eager attention otherwise, on
# every path that builds or loads the model (assembly from parts, ``from_pretrained`` of a saved checkpoint, the
# reference model of GRPO), so a checkpoint loads with the setting it was trained with.
_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}


def _supports(model_class, implementation: str) -> bool:
    if implementation == "eager":
        return True
    flag = "_supports_flash_attn" if implementation.startswith("flash_attention") else _SUPPORT_FLAGS.get(implementation)
    if flag is None:  # a kernel from elsewhere (e.g. "kernels-community/..."): the part's own check decides
        return True
    return bool(getattr(model_class, flag, False))


def part_model_class(config):
    """The base model class transformers maps a part's config to (WavLMConfig -> WavLMModel, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        return None


def attn_implementation_per_part(sub_configs: dict[str, Any], requested: str | dict | None) -> str | dict | None:
    """``requested`` as the per-sub-config dict ``from_pretrained`` takes: ``{"": requested, name: requested or
    "eager"}`` for each part, eager where the part's class lacks the kernel. A dict (already per part) or None (each
    part's default) is returned unchanged."""
    if not isinstance(requested, str):
        return requested
    resolved: dict[str, str] = {"": requested}
    for name, config in sub_configs.items():
        model_class = part_model_class(config) if config is not None else None
        resolved[name] = requested if model_class is None or _supports(model_class, requested) else "eager"
    return resolved


# -- what a model path holds -----------------------------------------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(ValueError):
    """A model path that is not something emoreason can load; the message names the file and the field."""


def _looks_local(name: str) -> bool:
    """A path on this machine rather than a Hub id ("org/name"): absolute, relative with ./ or ../, or deeper than one
    slash. Such a path that does not exist can only be a mistake."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name


def checkpoint_base(path: str | os.PathLike) -> str:
    """The folder (or Hub id) holding the full model that ``path`` stands on: an adapter folder's base, else ``path``.

    Checked before any weight loads: an adapter whose ``base_model_name_or_path`` is empty (SFT outputs written before
    the fix; such a folder keeps its assembled base in ``base/``, which is used), or names a local folder that is not
    there, and a folder that holds neither a model nor an adapter, are :class:`CheckpointError`."""
    folder = Path(path)
    adapter_config = folder / ADAPTER_CONFIG
    if adapter_config.is_file():
        try:
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        except ValueError as exc:
            raise CheckpointError(f"{adapter_config}: not valid JSON ({exc})") from exc
        if not base:
            if (folder / "base" / "config.json").is_file():
                return str((folder / "base").resolve())
            raise CheckpointError(
                f"{adapter_config}: base_model_name_or_path is empty, so the base model this adapter was trained on "
                "is unknown; set it to the base model's folder (an SFT from parts saves it as <output_dir>/base)")
        if not Path(base).is_dir() and _looks_local(str(base)):
            raise CheckpointError(f"{adapter_config}: base_model_name_or_path {base!r} is not a folder on this machine")
        if Path(base).is_dir() and not (Path(base) / "config.json").is_file():
            raise CheckpointError(f"{adapter_config}: base_model_name_or_path {base!r} holds no config.json")
        return str(base)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{folder}: model_name_or_path holds neither a model (config.json) nor an adapter ({ADAPTER_CONFIG}); "
                "point it at a saved EmoReason checkpoint or name the three parts (content_encoder, "
                "paralinguistic_encoder, language_model) instead")
        return str(path)
    if _looks_local(str(path)):
        raise CheckpointError(f"model_name_or_path {str(path)!r} is not a folder on this machine")
    return str(path)
