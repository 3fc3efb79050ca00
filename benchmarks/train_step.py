"""Training step time: cached encoder features vs live encoders, duration-proportional encoding vs 30 s padding.

    python benchmarks/train_step.py [--size base|large] [--clips 4] [--seconds 4] [--steps 3]
        [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16] [--lm-hidden 512 --lm-layers 4]

Random-weight models with real encoder shapes (``base``: Whisper-base + WavLM-base-plus, runs on a laptop CPU;
``large``: Whisper-large-v3 + WavLM-large, for a GPU) and a small Qwen2-shaped LM, all built from configs (nothing is
downloaded). One optimizer step = collate + forward + backward + AdamW on the trainable parts (projector + LM; the
encoders are frozen, as the feature cache requires). Every variant runs in this one process on the same batch, and the
script prints the ratios side by side, with tokens/s and (on a GPU) peak memory per variant.

``--device auto`` takes the GPU when there is one; ``--dtype auto`` is bf16 there (as the GPU recipes) and float32 on a
CPU. ``--lm-hidden 3584 --lm-layers 28`` gives Qwen2.5-7B's shape (random weights; the LM then trains in full here,
unlike the LoRA recipes, so that needs a large GPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {
    "base": {"whisper": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
             "wavlm": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)},
    "large": {"whisper": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                              num_mel_bins=128),
              "wavlm": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            feat_extract_norm="layer", do_stable_layer_norm=True)},
}


def build(size: str, out: Path, lm_hidden: int, lm_layers: int):
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel,
                              WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration)

    from emoreason.modeling import build_from_components
    from emoreason.testing.tiny import train_tokenizer

    shapes = SIZES[size]
    wcfg = WhisperConfig(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                         suppress_tokens=[], begin_suppress_tokens=[], decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                         d_model=shapes["whisper"]["d_model"], max_target_positions=64,
                         **{k: v for k, v in shapes["whisper"].items() if k != "d_model"})
    WhisperForConditionalGeneration(wcfg).save_pretrained(out / "whisper")
    WhisperFeatureExtractor(feature_size=wcfg.num_mel_bins).save_pretrained(out / "whisper")
    WavLMModel(WavLMConfig(layerdrop=0.0, mask_time_prob=0.0, **shapes["wavlm"])).save_pretrained(out / "wavlm")
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True).save_pretrained(out / "wavlm")
    tok = train_tokenizer(out / "lm")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=lm_hidden, intermediate_size=4 * lm_hidden,
                                 num_hidden_layers=lm_layers, num_attention_heads=8, num_key_value_heads=2,
                                 tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(out / "lm")
    return build_from_components(out / "whisper", out / "wavlm", out / "lm")


class MemoryCache:
    """The collator's cache interface over in-memory per-clip states (the disk format is measured by the tests)."""

    def __init__(self, items: dict):
        from emoreason.train.feature_cache import FeatureCache

        self.items = items
        self._reader = FeatureCache.__new__(FeatureCache)
        self._reader.index = dict.fromkeys(items, "mem")
        self._reader.get = lambda clip_id: self.items[clip_id]

    def lookup(self, clip_ids):
        return self._reader.lookup(clip_ids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lm-hidden", type=int, default=512)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    from emoreason.data.audio import write_wav
    from emoreason.data.collators import SFTCollator
    from emoreason.train.feature_cache import encode_clip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, processor = build(args.size, root / "model", args.lm_hidden, args.lm_layers)
        model.to(device=device, dtype=dtype).train()  # the model casts audio inputs to each tower's dtype
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.clips):
            seconds = args.seconds * (0.75 + 0.5 * i / max(1, args.clips - 1))  # clips of different lengths
            t = np.arange(int(seconds * 16000)) / 16000
            wav = 0.3 * np.sin(2 * np.pi * (140 + 20 * i) * t) + 0.01 * rng.standard_normal(t.shape)
            write_wav(root / f"clip{i}.wav", wav.astype(np.float32))
            padded = np.zeros(30 * 16000, dtype=np.float32)
            padded[: wav.shape[0]] = wav
            write_wav(root / f"clip{i}_30s.wav", padded)
            rows.append({"id": f"c{i}", "clip_id": f"c{i}", "audio": f"clip{i}.wav", "duration": seconds,
                         "instruction": "What emotion does the speaker express?",
                         "response": "<think>\nThe pitch is high and the rate is fast.\n</think>\n<answer>happy</answer>"})
        rows_30s = [{**r, "audio": f"clip{i}_30s.wav", "clip_id": f"p{i}"} for i, r in enumerate(rows)]
        model.eval()
        cache = MemoryCache({r["clip_id"]: encode_clip(model, processor, processor.load(str(root / r["audio"])))
                             for r in rows})
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        variants = {
            "cached features": (SFTCollator(processor, root, feature_cache=cache), rows),
            "live encoders": (SFTCollator(processor, root), rows),
            "live, 30 s padding": (SFTCollator(processor, root), rows_30s),
        }

        tokens: dict[str, int] = {}
        peak: dict[str, float] = {}

        def step(collator, batch_rows):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            batch = {k: v.to(device) for k, v in collator(batch_rows).items()}
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, int(batch["attention_mask"].sum())

        times = {name: [] for name in variants}
        for name, (collator, batch_rows) in variants.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, tokens[name] = step(collator, batch_rows)  # warm-up (also creates the optimizer state)
            if device == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
        for _ in range(args.steps):  # interleaved, so drifts in machine load hit every variant alike
            for name, (collator, batch_rows) in variants.items():
                times[name].append(step(collator, batch_rows)[0])

    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"train step, {args.size} encoder shapes, LM {args.lm_layers}x{args.lm_hidden}, {args.clips} clips of "
          f"~{args.seconds:g} s, {device} {str(dtype).replace('torch.', '')}, median of {args.steps}")
    for name, value in median.items():
        memory = f"   peak {peak[name]:6.2f} GiB" if name in peak else ""
        print(f"  {name:<22} {value * 1000:9.1f} ms   {tokens[name] / value:9.0f} tokens/s{memory}")
    print(f"cached / live                        = {median['cached features'] / median['live encoders']:.3f}"
          "   (target <= 0.5)")
    print(f"duration-proportional / 30 s padding = {median['live encoders'] / median['live, 30 s padding']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
