"""The processor: any input form, resampling, expansion of `<audio>`, padding to the longest clip only."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from emoreason.data.audio_tokens import MIN_SAMPLES, num_audio_tokens

SR = 16_000


def sweep(seconds: float, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 100 * t) * t)).astype(np.float32)


def test_paths_bytes_arrays_and_rates_all_give_the_same_features(tiny, tmp_path):
    _, processor = tiny
    wav16 = sweep(1.5)
    path = tmp_path / "clip.wav"
    sf.write(path, wav16, SR, subtype="FLOAT")
    from_array = processor("<audio>", [wav16])
    from_path = processor("<audio>", [str(path)])
    from_bytes = processor("<audio>", [path.read_bytes()])
    from_tensor = processor("<audio>", [torch.from_numpy(wav16)])
    for other in (from_path, from_bytes, from_tensor):
        assert torch.allclose(other["input_features"], from_array["input_features"], atol=1e-5)
        assert torch.equal(other["input_ids"], from_array["input_ids"])


def test_stereo_and_44k_input_is_downmixed_and_resampled(tiny, tmp_path):
    _, processor = tiny
    mono44 = sweep(2.0, rate=44_100)
    stereo = np.stack([mono44, mono44], axis=1)
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, 44_100)
    enc = processor("<audio>", [str(path)])
    assert enc["input_values_mask"].sum() == 2 * SR
    enc_tuple = processor("<audio>", [(stereo, 44_100)])
    assert enc_tuple["input_values_mask"].sum() == 2 * SR
    assert int((enc["input_ids"] == processor.audio_token_id).sum()) == num_audio_tokens(2 * SR, processor.stack_factor)


def test_batch_pads_to_longest_clip_not_30_seconds(tiny):
    _, processor = tiny
    enc = processor(["a <audio> b", "<audio> and <audio>"], [sweep(0.8), sweep(2.5), sweep(1.1)])
    assert enc["input_features"].shape[0] == 3
    assert enc["input_features"].shape[-1] == 250  # 2.5 s of 10 ms frames
    assert enc["input_features_mask"].sum(-1).tolist() == [80, 250, 110]
    assert enc["input_values"].shape[-1] == int(2.5 * SR)
    per_row = (enc["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    k = processor.stack_factor
    assert per_row == [num_audio_tokens(int(0.8 * SR), k), num_audio_tokens(int(2.5 * SR), k) +
                       num_audio_tokens(int(1.1 * SR), k)]


def test_short_clips_are_padded_and_long_ones_cut(tiny):
    _, processor = tiny
    enc = processor("<audio>", [np.full(10, 0.1, dtype=np.float32)])
    assert enc["input_values_mask"].sum() == MIN_SAMPLES
    long_clip = processor.load(np.zeros(processor.max_samples + 5000, dtype=np.float32) + 0.01)
    assert long_clip.shape[0] == processor.max_samples


def test_chat_template_renders_audio_parts_and_round_trips(tiny, tmp_path):
    _, processor = tiny
    messages = [
        {"role": "system", "content": "You listen carefully."},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "How does the speaker feel?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.count("<audio>") == 1 and "How does the speaker feel?" in text
    processor.save_pretrained(tmp_path)
    from emoreason.modeling import EmoReasonProcessor

    again = EmoReasonProcessor.from_pretrained(tmp_path)
    assert again.apply_chat_template(messages, add_generation_prompt=True) == text
    assert (again.stack_factor, again.audio_token_id) == (processor.stack_factor, processor.audio_token_id)


def test_a_processor_saved_with_another_stack_factor_than_its_model_is_refused_at_load(tiny_model_dir, tmp_path):
    """The model's config.json holds the audio token rule; a processor_config.json that disagrees would expand
    `<audio>` to a token count the model does not produce: an error naming both files, not a silent mismatch."""
    import json
    import shutil

    from emoreason.modeling import EmoReasonProcessor

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    assert EmoReasonProcessor.from_pretrained(folder).stack_factor == json.loads(
        (folder / "config.json").read_text())["stack_factor"]
    processor_config = folder / "processor_config.json"
    saved = json.loads(processor_config.read_text())
    saved["stack_factor"] = saved["stack_factor"] * 2
    processor_config.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"processor_config\.json: stack_factor 8 \(config\.json: 4\)"):
        EmoReasonProcessor.from_pretrained(folder)
