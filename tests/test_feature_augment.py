"""Training-time augmentation of cached tower states (SFT ``feature_augment``): random crops keep the clip's audio
tokens in step with its states, masks and dropout do what they say, bad settings fail at config time."""

from __future__ import annotations

import pytest
import torch

from emoreason.train.collators import SAMPLES_PER_FRAME, FeatureAugment, SFTCollator
from emoreason.data.audio_tokens import num_audio_tokens


def cached_batch(frames=(40, 25), layers=3, dim=8):
    """A padded batch as FeatureCache.lookup returns it, frame t of clip i holding the value 1000 i + t."""
    longest = max(frames)
    content = torch.zeros(len(frames), longest, dim)
    para = torch.zeros(layers, len(frames), longest - 1, dim)
    for i, n in enumerate(frames):
        ramp = 1000 * i + torch.arange(n, dtype=torch.float32)[:, None].expand(n, dim)
        content[i, :n] = ramp
        para[:, i, : n - 1] = ramp[: n - 1]  # WavLM gives a frame fewer
    return {"content_states": content, "paralinguistic_states": para,
            "num_samples": [n * SAMPLES_PER_FRAME + 100 for n in frames]}


def test_crop_takes_one_window_of_both_streams_and_shrinks_the_sample_count():
    batch = cached_batch()
    out = FeatureAugment(crop=0.5)(batch, torch.Generator().manual_seed(0))
    for i, n in enumerate((40, 25)):
        samples = out["num_samples"][i]
        keep = samples // SAMPLES_PER_FRAME
        assert samples == keep * SAMPLES_PER_FRAME and 0.5 * n <= keep <= n
        window = out["content_states"][i, :keep, 0]
        start = float(window[0]) - 1000 * i
        assert torch.equal(window, 1000 * i + start + torch.arange(keep, dtype=torch.float32))  # contiguous
        assert torch.equal(out["content_states"][i, keep:], torch.zeros_like(out["content_states"][i, keep:]))
        para = out["paralinguistic_states"][:, i, :, 0]
        assert torch.equal(para[:, 0], torch.full((3,), 1000 * i + start))  # same window in both streams
    assert out["paralinguistic_states"].dim() == 4


def test_crops_are_drawn_afresh_and_reproducible_from_the_seed():
    augment = FeatureAugment(crop=0.3)
    first = [augment(cached_batch(), torch.Generator().manual_seed(1))["num_samples"] for _ in range(2)]
    assert first[0] == first[1]
    generator = torch.Generator().manual_seed(1)
    draws = {tuple(augment(cached_batch(), generator)["num_samples"]) for _ in range(8)}
    assert len(draws) > 1


def test_content_dropout_and_time_mask_replace_frames_by_the_clip_mean():
    dropped = FeatureAugment(content_dropout=1.0)(cached_batch(), torch.Generator().manual_seed(0))
    clip = dropped["content_states"][0, :40]
    assert torch.allclose(clip, clip.mean(0, keepdim=True).expand_as(clip))
    assert torch.equal(dropped["paralinguistic_states"], cached_batch()["paralinguistic_states"])

    masked = FeatureAugment(time_mask=0.25, mask_span=5)(cached_batch(), torch.Generator().manual_seed(0))
    clip = masked["content_states"][0, :40, 0]
    hit = clip != torch.arange(40, dtype=torch.float32)
    assert 5 <= int(hit.sum()) <= 10 and torch.allclose(clip[hit], torch.full_like(clip[hit], 19.5))


def test_noise_scales_with_each_clip_and_inactive_settings_leave_the_collator_alone():
    noisy = FeatureAugment(noise=0.1)(cached_batch(), torch.Generator().manual_seed(0))
    delta = noisy["content_states"][1, :25] - cached_batch()["content_states"][1, :25]
    assert 0.2 < float(delta.std()) < 1.5  # 0.1 of the ramp's std (about 7.4)
    assert not FeatureAugment().active


class FakeCache:
    def __init__(self, batch):
        self.batch = batch

    def lookup(self, clip_ids):
        return {k: (v.clone() if torch.is_tensor(v) else list(v)) for k, v in self.batch.items()}


def test_an_augmented_cached_batch_runs_through_the_model(tiny, synth_corpus):
    model, processor = tiny
    rows = [{"id": f"c{i}", "clip_id": f"c{i}", "audio": "unused.wav", "instruction": "Name the speaker's emotion.",
             "response": "<answer>sad</answer>", "label": "sad"} for i in range(2)]
    batch = cached_batch(dim=model.config.content_config.d_model)
    dim = model.config.paralinguistic_config.hidden_size
    batch["paralinguistic_states"] = torch.randn(model.config.paralinguistic_config.num_hidden_layers + 1, 2, 39, dim)
    collator = SFTCollator(processor, synth_corpus.parent, feature_cache=FakeCache(batch),
                           feature_augment=FeatureAugment(crop=0.4, time_mask=0.2, noise=0.1, seed=3))
    for _ in range(3):
        out = collator(rows)
        lengths = out["input_values_mask"].sum(-1).tolist()
        tokens = (out["input_ids"] == model.config.audio_token_id).sum(-1).tolist()
        assert tokens == [num_audio_tokens(n, model.config.stack_factor) for n in lengths]
        with torch.no_grad():
            assert torch.isfinite(model(**out).loss)
    plain = SFTCollator(processor, synth_corpus.parent, feature_cache=FakeCache(batch))(rows)
    assert plain["input_values_mask"].sum(-1).tolist() == batch["num_samples"]


@pytest.mark.parametrize("spec, message", [
    ({"crop": 0}, "crop must be in"),
    ({"crop": 1.5}, "crop must be in"),
    ({"time_mask": 1.0}, "time_mask must be in"),
    ({"noise": -1}, "noise must be >= 0"),
    ({"content_dropout": 2}, "content_dropout must be in"),
    ({"mask_span": 0}, "mask_span must be >= 1"),
    ({"cropp": 0.5}, "unknown key"),
    ({"crop": "half"}, "must be a number"),
    ("crop=0.5", "JSON object"),
])
def test_bad_feature_augment_settings_fail_when_the_config_is_built(spec, message, tmp_path):
    from emoreason.train.sft import EmoReasonSFTConfig

    with pytest.raises(ValueError, match=message):
        EmoReasonSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, feature_augment=spec)


def test_feature_augment_reads_yaml_mappings_and_json_strings(tmp_path):
    from emoreason.train.sft import EmoReasonSFTConfig

    config = EmoReasonSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, seed=7,
                                feature_augment='{"crop": 0.5, "noise": 0.1}')
    assert config.feature_augmentation() == FeatureAugment(crop=0.5, noise=0.1, seed=7)
    assert EmoReasonSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).feature_augmentation() is None
