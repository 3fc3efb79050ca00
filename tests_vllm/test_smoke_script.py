"""scripts/vllm_smoke.py restates our `<audio>` token count so it runs anywhere: it must stay equal to the real one."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def load_smoke_script():
    spec = importlib.util.spec_from_file_location("vllm_smoke", REPO / "scripts" / "vllm_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_count_formula_matches_the_model():
    from emoreason.data.audio_tokens import num_audio_tokens

    smoke = load_smoke_script()
    for stack_factor in (1, 2, 4, 5, 8):
        for positions in (1500, 750):
            for samples in (0, 1, 159, 1_600, 1_601, 16_000, 48_123, 479_999, 480_000, 480_001, 1_000_000):
                assert smoke.num_audio_tokens(samples, stack_factor, positions) == \
                    num_audio_tokens(samples, stack_factor, positions), (samples, stack_factor, positions)


def test_synthesised_clip_is_a_16k_wav_of_the_asked_length():
    smoke = load_smoke_script()
    wav = smoke.synth_wav(2.5)
    assert wav[:4] == b"RIFF" and smoke.wav_num_samples_16k(wav) == 40_000
