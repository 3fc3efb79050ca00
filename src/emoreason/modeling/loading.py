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

from typing import Any

SAFE_LOAD_KWARGS: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False, "use_kernels": False}


def safe_load_kwargs(**kwargs: Any) -> dict[str, Any]:
    """``kwargs`` plus the safe defaults; asking for pickled weights or remote code is a clear error."""
    if kwargs.get("use_safetensors", True) is not True:
        raise ValueError("emoreason loads safetensors weights only (use_safetensors=False was requested)")
    if kwargs.get("trust_remote_code", False):
        raise ValueError("emoreason never runs a checkpoint's own code (trust_remote_code=True was requested)")
    return {**SAFE_LOAD_KWARGS, **kwargs}
