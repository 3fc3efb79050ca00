"""Fusion modes: how the projector combines the two towers' frame-aligned states, looked up by ``config.fusion``.

A mode adds its layers to the projector (``build``, returning the width of a fused frame) and combines the states
(``fuse``). Layers are registered on the projector itself under fixed names (``paralinguistic_proj``, ``gate``), so
checkpoints keep the same weight names whatever the registry looks like. Add a mode with :func:`register_fusion`.

- ``concat``: [content; paralinguistic], no parameters.
- ``sum``: content + W_p paralinguistic (the paralinguistic states projected to the content width).
- ``gated``: g * content + (1 - g) * W_p paralinguistic, with g = sigmoid(W_g [content; paralinguistic]) per dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FusionMode:
    build: Callable[[nn.Module, int, int], int]  # (projector, content_dim, paralinguistic_dim) -> fused frame width
    fuse: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (projector, content, para) -> frames


FUSION_MODES: dict[str, FusionMode] = {}


def register_fusion(name: str, build: Callable[[nn.Module, int, int], int],
                    fuse: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> FusionMode:
    if name in FUSION_MODES:
        raise ValueError(f"fusion mode {name!r} is already registered")
    FUSION_MODES[name] = mode = FusionMode(build, fuse)
    return mode


def get_fusion(name: str) -> FusionMode:
    if name not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {tuple(FUSION_MODES)}, got {name!r}")
    return FUSION_MODES[name]


def _build_concat(projector: nn.Module, content_dim: int, para_dim: int) -> int:
    return content_dim + para_dim


def _fuse_concat(projector: nn.Module, content: torch.Tensor, para: torch.Tensor) -> torch.Tensor:
    return torch.cat([content, para], dim=-1)


def _build_sum(projector: nn.Module, content_dim: int, para_dim: int) -> int:
    projector.paralinguistic_proj = nn.Linear(para_dim, content_dim)
    return content_dim


def _fuse_sum(projector: nn.Module, content: torch.Tensor, para: torch.Tensor) -> torch.Tensor:
    return content + projector.paralinguistic_proj(para)


def _build_gated(projector: nn.Module, content_dim: int, para_dim: int) -> int:
    _build_sum(projector, content_dim, para_dim)
    projector.gate = nn.Linear(content_dim + para_dim, content_dim)
    return content_dim


def _fuse_gated(projector: nn.Module, content: torch.Tensor, para: torch.Tensor) -> torch.Tensor:
    gate = torch.sigmoid(projector.gate(torch.cat([content, para], dim=-1)))
    return gate * content + (1 - gate) * projector.paralinguistic_proj(para)


register_fusion("concat", _build_concat, _fuse_concat)
register_fusion("sum", _build_sum, _fuse_sum)
register_fusion("gated", _build_gated, _fuse_gated)

__all__ = ["FUSION_MODES", "FusionMode", "get_fusion", "register_fusion"]
