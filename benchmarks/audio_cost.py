"""Audio costs what it lasts: tokens and encoder time of a 4 s clip vs the same clip padded to Whisper's 30 s window.

Both towers at realistic shapes with random weights (whisper-base encoder: 512 wide, 6 layers; wavlm-base-plus:
768 wide, 12 layers, 7 conv layers of 512 channels), run through EmoReasonModel.get_audio_features. The two cases are
timed alternately in one run and the median ratio printed (absolute times on shared machines are not stable).

    python benchmarks/audio_cost.py [--seconds 4] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import Qwen2Config, Wav2Vec2FeatureExtractor, WavLMConfig, WhisperConfig, WhisperFeatureExtractor

from emoreason.modeling import EmoReasonConfig, EmoReasonModel

SR = 16_000


def build(stack_factor: int) -> EmoReasonModel:
    whisper_base = WhisperConfig(
        d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, num_mel_bins=80,
        decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=256,
    )
    wavlm_base_plus = WavLMConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        feat_extract_norm="group", layerdrop=0.0,
    )
    small_lm = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)
    config = EmoReasonConfig(content_config=whisper_base.to_dict(), paralinguistic_config=wavlm_base_plus.to_dict(),
                             text_config=small_lm.to_dict(), stack_factor=stack_factor, audio_token_id=999)
    return EmoReasonModel(config).eval()


def features(wav: np.ndarray, whisper_fe, wavlm_fe) -> dict[str, torch.Tensor]:
    mel = whisper_fe(wav, sampling_rate=SR, padding="longest", truncation=False, return_tensors="pt")["input_features"]
    mel = mel[..., : wav.shape[0] // 160]
    values = wavlm_fe(wav, sampling_rate=SR, return_tensors="pt")["input_values"]
    return {
        "input_features": mel,
        "input_features_mask": torch.ones(1, mel.shape[-1], dtype=torch.long),
        "input_values": values,
        "input_values_mask": torch.ones_like(values, dtype=torch.long),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stack-factor", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.stack_factor)
    whisper_fe, wavlm_fe = WhisperFeatureExtractor(feature_size=80), Wav2Vec2FeatureExtractor(do_normalize=True)
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(int(args.seconds * SR))).astype(np.float32)
    padded = np.pad(clip, (0, 30 * SR - clip.shape[0]))
    cases = {"own length": features(clip, whisper_fe, wavlm_fe), "padded to 30 s": features(padded, whisper_fe, wavlm_fe)}

    times: dict[str, list[float]] = {name: [] for name in cases}
    tokens: dict[str, int] = {}
    with torch.inference_mode():
        for name, batch in cases.items():  # warm-up
            tokens[name] = int(model.get_audio_features(**batch)[1][0])
        for _ in range(args.repeats):
            for name, batch in cases.items():
                start = time.perf_counter()
                model.get_audio_features(**batch)
                times[name].append(time.perf_counter() - start)

    own, full = statistics.median(times["own length"]), statistics.median(times["padded to 30 s"])
    print(f"clip: {args.seconds:g} s, stack factor {args.stack_factor}, {args.threads} thread(s), "
          f"median of {args.repeats} alternating runs")
    print(f"audio tokens : {tokens['own length']} vs {tokens['padded to 30 s']} -> "
          f"ratio {tokens['own length'] / tokens['padded to 30 s']:.3f} (target <= 0.200)")
    print(f"encoder time : {own * 1000:.0f} ms vs {full * 1000:.0f} ms -> ratio {own / full:.3f} (target <= 0.250)")


if __name__ == "__main__":
    main()
