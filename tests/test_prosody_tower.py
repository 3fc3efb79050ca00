"""The tower prosody warm-up (emoreason.demo.prosody_tower): label-free, training clips only, the tower alone changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emoreason.data.audio import write_wav
from emoreason.data.schema import read_records
from emoreason.demo.prosody_tower import SUMMARY_FILE, prosody_targets, warm_up_paralinguistic_tower

SR = 16_000


def _tone(f0: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amplitude * sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))).astype(np.float32)


def test_targets_follow_the_pitch_and_mark_silence_unvoiced():
    wave = np.concatenate([_tone(120.0), np.zeros(SR // 2, np.float32), _tone(240.0)])
    targets, voiced = prosody_targets(wave, frame_seconds=0.02)
    assert targets.shape == (voiced.shape[0], 3) and abs(targets.shape[0] - 125) <= 2  # 2.5 s at 20 ms
    low, gap, high = slice(10, 40), slice(55, 70), slice(90, 115)
    assert bool(voiced[low].all()) and bool(voiced[high].all()) and not bool(voiced[gap].any())
    assert float(targets[low, 0].mean()) == pytest.approx(np.log2(120 / 150), abs=0.05)
    assert float(targets[high, 0].mean()) == pytest.approx(np.log2(240 / 150), abs=0.05)
    assert float(targets[gap, 0].abs().max()) == 0.0 and float(targets[gap, 1].max()) == 0.0
    assert float(targets[gap, 2].mean()) < float(targets[low, 2].mean()) - 1.0  # energy: silence far below speech


def _manifest(tmp_path, test_audio: str) -> list:
    rows = []
    for i, (f0, split) in enumerate([(110.0, "train"), (220.0, "train"), (160.0, "train"), (300.0, "test")]):
        audio = f"wav/c{i}.wav"
        if split == "train":
            write_wav(tmp_path / audio, _tone(f0, seconds=0.8))
        else:
            audio = test_audio  # never written: reading it would fail
        rows.append({"id": f"c{i}", "audio": audio, "split": split, "label": "happy", "speaker": f"s{i}",
                     "transcript": "hello there", "corpus": "synthetic", "duration": 0.8})
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_records(path)


def test_only_the_tower_changes_and_only_training_clips_are_read(tiny_model_dir, tmp_path):
    from emoreason.modeling import load_pretrained

    records = _manifest(tmp_path, test_audio="wav/missing-test-clip.wav")
    model, processor = load_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.audio_encoder.paralinguistic_encoder.requires_grad_(False)  # frozen, as training keeps it
    summary = warm_up_paralinguistic_tower(model, processor, records, tmp_path, epochs=6, clips_per_step=2,
                                           progress=False)
    assert summary["clips"] == 3 and summary["steps"] == 12
    assert summary["last_epoch_loss"] < summary["first_epoch_loss"], summary
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".paralinguistic_encoder." in k for k in changed), sorted(changed)[:5]
    # the frozen tower is given back frozen, in the mode it was in
    assert not any(p.requires_grad for p in model.model.audio_encoder.paralinguistic_encoder.parameters())
    assert not model.model.audio_encoder.paralinguistic_encoder.training


def test_a_model_with_fitted_feature_normalisation_is_refused(tmp_path):
    from emoreason.modeling import load_pretrained
    from emoreason.testing.tiny import build_tiny_model

    model, processor = load_pretrained(build_tiny_model(tmp_path / "m", random_feature_stats=True))
    with pytest.raises(ValueError, match="feature normalisation is already fitted"):
        warm_up_paralinguistic_tower(model, processor, [], tmp_path, progress=False)


def test_no_training_clips_is_a_clear_error(tiny_model_dir, tmp_path):
    from emoreason.modeling import load_pretrained

    records = [r for r in _manifest(tmp_path, test_audio="wav/x.wav") if r.split == "test"]
    model, processor = load_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="no training-split clips"):
        warm_up_paralinguistic_tower(model, processor, records, tmp_path, progress=False)


@pytest.mark.slow
def test_the_warmed_up_model_is_saved_loadable_with_its_summary(prosody_tiny_model_dir):
    from emoreason.modeling import load_pretrained

    summary = json.loads((prosody_tiny_model_dir / SUMMARY_FILE).read_text())
    assert summary["clips"] > 0 and summary["last_epoch_loss"] < 0.5 * summary["first_epoch_loss"], summary
    model, _ = load_pretrained(prosody_tiny_model_dir)
    assert not model.model.audio_encoder.projector.feature_norm_fitted


class _FirstLoss(Exception):
    """Stops the warm-up at its first loss: the placement is then known and the meta device cannot go further."""


def test_head_targets_and_batches_follow_the_towers_device(tiny_model_dir, tmp_path, monkeypatch):
    """A tower on an accelerator trains there: every tensor the loop builds is put on the tower's device.

    No GPU is needed to check the placement: the tower is moved to PyTorch's "meta" device (tensors with shapes and
    no data), which, like CUDA, refuses to mix with CPU tensors, so a head, target or batch left on the CPU would show.
    Meta tensors cannot be read back (frame counts, the loss value), so the tower's forward is replaced by a stand-in
    that checks its inputs and returns meta states, and the run stops at the first loss, whose inputs are checked.
    That the CPU path still trains is test_only_the_tower_changes_and_only_training_clips_are_read."""
    from emoreason.demo import prosody_tower
    from emoreason.modeling import load_pretrained

    records = _manifest(tmp_path, test_audio="wav/missing-test-clip.wav")
    model, processor = load_pretrained(tiny_model_dir)
    inner = model.model.audio_encoder
    inner.paralinguistic_encoder.to("meta")
    hidden = inner.paralinguistic_encoder.config.hidden_size
    seen = {}

    def encode(input_values, input_values_mask):
        seen["input_values"], seen["input_values_mask"] = input_values.device, input_values_mask.device
        frames = input_values.shape[1] // 320
        return torch.zeros(input_values.shape[0], frames, hidden, device="meta"), None  # where the tower is

    def first_loss(predicted, lengths, targets, voiced, clip_z, clip_mask):
        seen.update(predicted=predicted.device, clip_z=clip_z.device, clip_mask=clip_mask.device,
                    targets={t.device for t in targets}, voiced={v.device for v in voiced})
        raise _FirstLoss

    monkeypatch.setattr(inner, "encode_paralinguistic", encode)
    monkeypatch.setattr(prosody_tower, "_prosody_loss", first_loss)
    with pytest.raises(_FirstLoss):
        warm_up_paralinguistic_tower(model, processor, records, tmp_path, epochs=1, clips_per_step=2, progress=False)
    meta = torch.device("meta")
    assert seen == {"input_values": meta, "input_values_mask": meta, "predicted": meta, "clip_z": meta,
                    "clip_mask": meta, "targets": {meta}, "voiced": {meta}}
