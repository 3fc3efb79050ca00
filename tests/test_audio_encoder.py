"""The audio path has one owner, ``EmoReasonAudioEncoder`` (``model.audio_encoder``): its token counts are the
processor's, a clip's embeddings do not depend on its batch, and checkpoints and adapters saved with the earlier
weight names (``model.projector.*``, ``model.content_encoder.*``, ...) load to the same model."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from emoreason.data.audio_tokens import num_audio_tokens
from emoreason.modeling import EmoReasonAudioEncoder, load_pretrained
from emoreason.modeling.audio_encoder import LEGACY_CHECKPOINT_KEYS, build_projector
from emoreason.modeling.lora import apply_lora

SR = 16_000
AUDIO_PARTS = ("content_encoder", "paralinguistic_encoder", "projector")


def clip(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def to_old_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout checkpoints had before the audio encoder: ``...model.audio_encoder.X`` -> ``...model.X``."""
    return {key.replace("model.audio_encoder.", "model.", 1): value for key, value in tensors.items()}


def prompt_batch(processor, clips):
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What emotion is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor([text] * len(clips), clips)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, processor = load_pretrained(tiny_model_dir)
    return model.eval(), processor


def test_the_model_holds_one_audio_encoder_that_owns_towers_and_projector(tiny):
    model, _ = tiny
    encoder = model.get_audio_encoder()
    assert isinstance(encoder, EmoReasonAudioEncoder) and encoder is model.model.audio_encoder
    assert [name for name, _ in model.model.named_children()] == ["audio_encoder", "language_model"]
    assert [name for name, _ in encoder.named_children()] == list(AUDIO_PARTS)
    names = set(model.state_dict())
    assert all(not n.startswith(tuple(f"model.{part}." for part in AUDIO_PARTS)) for n in names)
    assert {n.split(".")[2] for n in names if n.startswith("model.audio_encoder.")} == set(AUDIO_PARTS)
    assert encoder.dtype == torch.float32 and encoder.device.type == "cpu"
    # frozen towers (the config trains neither), trainable projector; training mode leaves frozen towers in eval
    assert not any(p.requires_grad for p in encoder.content_encoder.parameters())
    assert not any(p.requires_grad for p in encoder.paralinguistic_encoder.parameters())
    assert all(p.requires_grad for p in encoder.projector.parameters())
    encoder.train()
    try:
        assert encoder.projector.training and not encoder.content_encoder.training
        assert not encoder.paralinguistic_encoder.training
    finally:
        encoder.eval()


def test_token_counts_are_the_processors_and_a_clip_ignores_its_batch_mates(tiny):
    model, processor = tiny
    encoder = model.get_audio_encoder()
    raw = [clip(s, seed) for seed, s in enumerate((0.05, 1.3, 0.37, 2.9))]
    clips = [processor.load(wav) for wav in raw]  # as the processor and the servers take a clip (0.1 s at least)
    with torch.no_grad():
        embeds, tokens = encoder(**processor.audio_features(clips))
        per_clip = encoder.embed_clips(*_unpadded(processor, clips))
        alone = [encoder(**processor.audio_features([wav])) for wav in clips]
    expected = [num_audio_tokens(len(wav), model.config.stack_factor, processor.max_source_positions) for wav in raw]
    assert tokens == expected and embeds.shape[:2] == (len(clips), max(expected))
    assert [e.shape[0] for e in per_clip] == expected
    for i, (single, single_tokens) in enumerate(alone):
        assert single_tokens == [expected[i]]
        torch.testing.assert_close(embeds[i, : expected[i]], single[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(per_clip[i], single[0], rtol=1e-4, atol=1e-5)
    # control: different clips give different embeddings
    assert not torch.allclose(per_clip[1][:3], per_clip[3][:3])


def _unpadded(processor, clips):
    per_clip = [processor.audio_features([wav]) for wav in clips]
    return [f["input_features"][0] for f in per_clip], [f["input_values"][0] for f in per_clip]


def test_an_old_layout_checkpoint_loads_to_the_same_model(tiny, tmp_path):
    model, processor = tiny
    new, old = tmp_path / "new", tmp_path / "old"
    model.save_pretrained(new)
    processor.save_pretrained(new)
    saved = load_file(str(new / "model.safetensors"))
    assert any(k.startswith("model.audio_encoder.projector.") for k in saved)
    shutil.copytree(new, old)
    legacy = to_old_names(saved)
    assert any(k.startswith("model.projector.") for k in legacy) and not any("audio_encoder" in k for k in legacy)
    save_file(legacy, str(old / "model.safetensors"), metadata={"format": "pt"})

    batch = prompt_batch(processor, [clip(1.1, 1), clip(0.6, 2)])
    (from_new, _), (from_old, _) = load_pretrained(new), load_pretrained(old)
    with torch.no_grad():
        assert torch.equal(from_new.eval()(**batch).logits, from_old.eval()(**batch).logits)
    for name, tensor in from_new.state_dict().items():
        assert torch.equal(tensor, from_old.state_dict()[name]), name


def test_an_old_lora_adapter_with_the_projector_loads_through_get_model(tiny_model_dir, tmp_path):
    from emoreason.train.common import EmoReasonModelArguments, get_model

    base, processor = load_pretrained(tiny_model_dir)
    peft_model = apply_lora(base, r=4, alpha=8, dropout=0.0)  # modules_to_save=["projector"]
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: LoRA factors and the projector copy away from the base
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    new, old = tmp_path / "new", tmp_path / "old"
    peft_model.save_pretrained(new)
    saved = load_file(str(new / "adapter_model.safetensors"))
    projector_keys = [k for k in saved if ".projector." in k]
    assert projector_keys
    assert all(k.startswith("base_model.model.model.audio_encoder.projector.") for k in projector_keys)
    shutil.copytree(new, old)
    save_file(to_old_names(saved), str(old / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert json.loads((old / "adapter_config.json").read_text())["modules_to_save"] == ["projector"]

    trained = {n: p.detach() for n, p in peft_model.get_audio_encoder().projector.modules_to_save["default"]
               .named_parameters()}
    batch = prompt_batch(processor, [clip(0.9, 3)])
    logits = {}
    for layout, folder in (("new", new), ("old", old)):
        loaded = get_model(EmoReasonModelArguments(model_name_or_path=str(folder))).eval()
        projector = loaded.get_audio_encoder().projector.modules_to_save["default"]
        for name, p in projector.named_parameters():
            assert torch.equal(p, trained[name]), (layout, name)
        with torch.no_grad():
            logits[layout] = loaded(**batch).logits
    assert torch.equal(logits["new"], logits["old"])


def test_the_legacy_key_rule_renames_only_the_audio_parts():
    (pattern, replacement), = LEGACY_CHECKPOINT_KEYS.items()
    for part in AUDIO_PARTS:
        assert re.sub(pattern, replacement, f"model.{part}.x.weight") == f"model.audio_encoder.{part}.x.weight"
    for unchanged in ("model.language_model.layers.0.q_proj.weight", "lm_head.weight",
                      "model.audio_encoder.projector.linear_1.weight"):
        assert re.sub(pattern, replacement, unchanged) == unchanged


def test_the_projector_is_built_in_one_place(tiny):
    model, _ = tiny
    assert type(build_projector(model.config)) is type(model.get_audio_encoder().projector)
