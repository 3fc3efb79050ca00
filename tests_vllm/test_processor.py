"""vLLM's multimodal processor for our model expands `<audio>` exactly as our own processor does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_vllm

pytestmark = needs_vllm

DURATIONS = [0.03, 0.5, 1.0, 3.3, 7.77, 29.99, 30.0]  # below the minimum, ordinary, up to the window (past it: refused)


def clip(seconds: float, sampling_rate: int = 16_000, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wav = (0.1 * rng.standard_normal((int(round(seconds * sampling_rate)), channels))).astype(np.float32)
    return wav[:, 0] if channels == 1 else wav


def vllm_audio_token_counts(mm_processor, model_config, prompt: str, clips: list) -> list[int]:
    tokenizer = mm_processor.info.get_tokenizer()
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out = mm_processor(ids, mm_processor.info.parse_mm_data({"audio": clips}))
    audio_id = model_config.hf_config.audio_token_id
    ranges = out["mm_placeholders"]["audio"]
    for placeholder in ranges:  # each range covers only `<audio>` tokens
        assert set(out["prompt_token_ids"][placeholder.offset:placeholder.offset + placeholder.length]) == {audio_id}
    assert out["prompt_token_ids"].count(audio_id) == sum(r.length for r in ranges)
    return [r.length for r in ranges]


@pytest.mark.parametrize("seconds", DURATIONS)
def test_placeholder_count_matches_our_processor(seconds, mm_processor, model_config, hf_model_and_processor):
    from emoreason.data.audio_tokens import num_audio_tokens

    _, processor = hf_model_and_processor
    wav = clip(seconds)
    prompt = "<|im_start|>user\n<audio>\nWhat emotion?<|im_end|>\n<|im_start|>assistant\n"
    ours = processor(text=prompt, audio=wav)["input_ids"][0].tolist().count(processor.audio_token_id)
    [theirs] = vllm_audio_token_counts(mm_processor, model_config, prompt, [(wav, 16_000)])
    assert theirs == ours == num_audio_tokens(len(wav), model_config.hf_config.stack_factor)


def test_several_clips_resampled_and_stereo(mm_processor, model_config, hf_model_and_processor):
    """Clips at other rates and channel counts: vLLM resamples/downmixes, our processor does too; counts agree."""
    _, processor = hf_model_and_processor
    clips = [(clip(2.0, 44_100, channels=2, seed=1), 44_100), (clip(0.7, 8_000, seed=2), 8_000),
             (clip(5.0, seed=3), 16_000)]
    prompt = "<audio> first <audio> second <audio> third"
    # vLLM takes multichannel arrays as (channels, time) (torchaudio's layout), ours as (time, channels) (soundfile's).
    theirs = vllm_audio_token_counts(mm_processor, model_config, prompt, [(wav.T, rate) for wav, rate in clips])
    ours = [processor.num_audio_tokens(len(processor.load(wav, rate))) for wav, rate in clips]
    assert theirs == ours
    assert len(set(theirs)) == 3


def test_features_match_our_processor(mm_processor, hf_model_and_processor):
    """Per clip, vLLM's model inputs are our processor's features, unpadded (independent of batch-mates)."""
    _, processor = hf_model_and_processor
    clips = [clip(1.3, seed=4), clip(4.1, seed=5)]
    ids = mm_processor.info.get_tokenizer().encode("<audio><audio>", add_special_tokens=False)
    out = mm_processor(ids, mm_processor.info.parse_mm_data({"audio": [(c, 16_000) for c in clips]}))
    data = out["mm_kwargs"].get_data()
    ours = processor.audio_features([processor.load(c) for c in clips])
    for i, wav in enumerate(clips):
        frames = int(ours["input_features_mask"][i].sum())
        samples = int(ours["input_values_mask"][i].sum())
        assert data["input_features"][i].shape[-1] == frames
        torch.testing.assert_close(data["input_features"][i], ours["input_features"][i, :, :frames])
        torch.testing.assert_close(data["input_values"][i], ours["input_values"][i, :samples])


def test_dummy_inputs_profile_the_longest_clip(mm_processor, model_config):
    from emoreason.data.audio_tokens import max_samples_for, num_audio_tokens

    config = model_config.hf_config
    longest = num_audio_tokens(max_samples_for(config.content_config.max_source_positions), config.stack_factor)
    assert mm_processor.info.get_mm_max_tokens_per_item(4096, {"audio": 1}) == {"audio": longest}
    dummy = mm_processor.get_dummy_mm_inputs({"audio": 2})
    assert [r.length for r in dummy["mm_placeholders"]["audio"]] == [longest, longest]


def test_chat_messages_render_like_our_processor(model_config, mm_processor, hf_model_and_processor):
    """vLLM's chat layer puts `<audio>` where our processor's chat template does, given the checkpoint's template."""
    import base64
    import io

    import soundfile as sf
    from vllm.renderers.chat_utils import parse_chat_messages
    from vllm.renderers.hf import safe_apply_chat_template

    _, processor = hf_model_and_processor
    buffer = io.BytesIO()
    sf.write(buffer, clip(1.0), 16_000, format="WAV")
    audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(),
                                                         "format": "wav"}}
    messages = [{"role": "system", "content": "You are an expert in emotion recognition from speech."},
                {"role": "user", "content": [audio_part, {"type": "text", "text": "What emotion?"}]}]
    conversation, mm_data, _ = parse_chat_messages(messages, model_config, content_format="string")
    rendered = safe_apply_chat_template(model_config, mm_processor.info.get_tokenizer(), conversation,
                                        chat_template=processor.chat_template, tokenize=False,
                                        add_generation_prompt=True)
    assert rendered == processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.count("<audio>") == 1 and len(mm_data["audio"]) == 1


def test_unusable_audio_is_refused_with_the_reason(mm_processor):
    from emoreason.data.audio import AudioError

    ids = mm_processor.info.get_tokenizer().encode("<audio>", add_special_tokens=False)
    broken = np.full(16_000, np.nan, dtype=np.float32)
    with pytest.raises(AudioError, match="NaN"):
        mm_processor(ids, mm_processor.info.parse_mm_data({"audio": [(broken, 16_000)]}))
    # Longer than the encoder window: refused (the built-in server refuses it too), not cut without a word; the
    # window itself is served (memory is profiled at it).
    window = mm_processor.info.max_audio_samples
    tone = (0.1 * np.sin(np.arange(window + 16_000) / 16.0)).astype(np.float32)
    with pytest.raises(AudioError, match="31.00 s long; this model hears at most 30 s"):
        mm_processor(ids, mm_processor.info.parse_mm_data({"audio": [(tone, 16_000)]}))
    assert mm_processor(ids, mm_processor.info.parse_mm_data({"audio": [(tone[:window], 16_000)]}))
