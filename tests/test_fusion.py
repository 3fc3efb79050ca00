"""The projector's fusion modes are a registry (emoreason.modeling.fusion), with the weight names checkpoints use."""

from __future__ import annotations

import pytest
import torch

from emoreason.modeling.fusion import FUSION_MODES, get_fusion, register_fusion


class Holder(torch.nn.Module):
    pass


def test_registered_modes_and_their_weight_names():
    assert list(FUSION_MODES) == ["concat", "sum", "gated"]
    names = {}
    for name, mode in FUSION_MODES.items():
        holder = Holder()
        width = mode.build(holder, 6, 4)
        names[name] = sorted(k for k, _ in holder.named_parameters())
        content, para = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
        frames = mode.fuse(holder, content, para)
        assert frames.shape == (2, 3, width)
    assert names == {"concat": [], "sum": ["paralinguistic_proj.bias", "paralinguistic_proj.weight"],
                     "gated": ["gate.bias", "gate.weight", "paralinguistic_proj.bias", "paralinguistic_proj.weight"]}
    content, para = torch.randn(1, 2, 6), torch.randn(1, 2, 4)
    assert torch.equal(get_fusion("concat").fuse(Holder(), content, para), torch.cat([content, para], -1))


def test_a_new_mode_reaches_the_config_and_the_projector(tiny_model_dir):
    import json

    from emoreason.modeling import EmoReasonConfig, EmoReasonProjector

    with pytest.raises(ValueError, match="fusion"):
        get_fusion("para_only")
    register_fusion("para_only", lambda p, dc, dp: dp, lambda p, content, para: para)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_fusion("para_only", lambda p, dc, dp: dp, lambda p, content, para: para)
        config = EmoReasonConfig(**{**json.loads((tiny_model_dir / "config.json").read_text()), "fusion": "para_only"})
        projector = EmoReasonProjector(config)
        para_dim = config.paralinguistic_config.hidden_size
        assert projector.linear_1.in_features == para_dim * config.stack_factor
    finally:
        del FUSION_MODES["para_only"]
