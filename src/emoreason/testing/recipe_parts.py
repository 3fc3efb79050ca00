"""Random-weight parts in the architectures (and, at ``scale="real"``, the shapes) of each GPU recipe's checkpoints.

A GPU recipe names three Hub checkpoints (``content_encoder``, ``paralinguistic_encoder``, ``language_model``). Nothing
can be downloaded in tests, on CI or on a fresh GPU machine without a token, so this module builds stand-ins from
configs: the same model classes with the same structural settings (Whisper-large-v3's 128 mel bins, the large SSL
models' pre-norm "stable" layer norm, grouped-query attention, Llama 3.x's tokenizer that adds its own BOS), saved as
Hub-style folders that the recipe's own loading code then reads.

- ``scale="tiny"``: widths of 64 and two layers per part, for CPU tests (the recipe-chain test).
- ``scale="real"``: the published shapes (Whisper-large-v3 encoder 32 x 1280, WavLM/HuBERT-large 24 x 1024,
  Qwen2.5-7B 28 x 3584 / Llama-3.1-8B 32 x 4096 with their vocabularies), for ``scripts/gpu_smoke.py`` on a GPU.
- ``scale="proxy"``: the real depths at a tiny width, for host-overhead measurements (``benchmarks/train_step.py``).

The shapes are the configs published with those checkpoints (hidden sizes, layers, heads, vocabularies).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCALES = ("tiny", "proxy", "real")


@dataclass(frozen=True)
class RecipeParts:
    """What one recipe's three checkpoints are: classes and structural settings, and each scale's sizes."""

    paralinguistic: str  # "wavlm" | "hubert"
    language_model: str  # "qwen2" | "llama"
    tokenizer_style: str  # testing.tiny.TOKENIZER_STYLES
    real_lm: dict[str, Any] = field(default_factory=dict)
    real_vocab: int = 0


WHISPER_LARGE_V3 = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120)
SSL_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

RECIPE_PARTS: dict[str, RecipeParts] = {
    "qwen2.5-7b-whisper-wavlm": RecipeParts(
        paralinguistic="wavlm", language_model="qwen2", tokenizer_style="chatml",
        real_lm=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                     max_position_embeddings=32768),
        real_vocab=152064,
    ),
    "llama3.1-8b-whisper-hubert": RecipeParts(
        paralinguistic="hubert", language_model="llama", tokenizer_style="llama3",
        real_lm=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500_000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        real_vocab=128256,
    ),
}


def recipe_parts(recipe: str | Path) -> RecipeParts:
    """The parts of a recipe, by its folder name (``recipes/<name>/sft.yaml`` or ``<name>``)."""
    path = Path(recipe)
    name = path.parent.name if path.suffix in (".yaml", ".yml") else path.name
    try:
        return RECIPE_PARTS[name]
    except KeyError:
        raise ValueError(f"no stand-in parts for recipe {name!r}: add its architectures to "
                         f"emoreason.testing.recipe_parts.RECIPE_PARTS (known: {', '.join(RECIPE_PARTS)})") from None


def _sizes(spec: RecipeParts, scale: str, tiny_width: int) -> tuple[dict, dict, dict]:
    """(Whisper encoder, SSL encoder, LM) size settings at ``scale``."""
    from .tiny import lm_heads

    if scale == "real":
        return dict(WHISPER_LARGE_V3), dict(SSL_LARGE), dict(spec.real_lm)
    heads, kv_heads = lm_heads(tiny_width)
    layers = {"tiny": (2, 2, 2), "proxy": (WHISPER_LARGE_V3["encoder_layers"], SSL_LARGE["num_hidden_layers"],
                                            spec.real_lm["num_hidden_layers"])}[scale]
    whisper = dict(d_model=tiny_width, encoder_layers=layers[0], encoder_attention_heads=4,
                   encoder_ffn_dim=2 * tiny_width)
    ssl = dict(hidden_size=tiny_width, num_hidden_layers=layers[1], num_attention_heads=4,
               intermediate_size=2 * tiny_width, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
               num_conv_pos_embedding_groups=4)
    lm = {k: v for k, v in spec.real_lm.items() if k in ("rope_theta", "rms_norm_eps", "rope_scaling")}
    lm.update(hidden_size=tiny_width, intermediate_size=2 * tiny_width, num_hidden_layers=layers[2],
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=16384)
    return whisper, ssl, lm


def build_recipe_parts(recipe: str | Path, out_dir: str | Path, scale: str = "tiny", tiny_width: int = 64,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> dict[str, Path]:
    """Save random ``whisper``, ``paralinguistic`` and ``lm`` folders for ``recipe`` under ``out_dir``; returns the
    three paths in the order the recipe's ``content_encoder`` / ``paralinguistic_encoder`` / ``language_model`` take.

    Built directly on ``device`` in ``dtype`` (a 7B LM in bf16 on a GPU takes seconds; on a CPU in fp32, minutes)."""
    from transformers import (
        HubertConfig,
        HubertModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Wav2Vec2FeatureExtractor,
        WavLMConfig,
        WavLMModel,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    from .tiny import train_tokenizer

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    spec = recipe_parts(recipe)
    out = Path(out_dir)
    paths = {"whisper": out / "whisper", "paralinguistic": out / spec.paralinguistic, "lm": out / "lm"}
    whisper_size, ssl_size, lm_size = _sizes(spec, scale, tiny_width)
    torch.manual_seed(seed)
    with torch.device(device):
        # Whisper-large-v3: 128 mel bins; only the encoder is used, so the decoder stays minimal.
        whisper_cfg = WhisperConfig(
            vocab_size=128, num_mel_bins=128, max_source_positions=1500, decoder_layers=1, decoder_attention_heads=4,
            decoder_ffn_dim=64, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, suppress_tokens=[], begin_suppress_tokens=[], **whisper_size)
        WhisperForConditionalGeneration._from_config(whisper_cfg, dtype=dtype).save_pretrained(paths["whisper"])
        WhisperFeatureExtractor(feature_size=128).save_pretrained(paths["whisper"])

        # WavLM-large / HuBERT-large: pre-norm transformer ("stable" layer norm), layer-normed conv feature encoder.
        ssl_common = dict(feat_extract_norm="layer", do_stable_layer_norm=True, layerdrop=0.0, mask_time_prob=0.0,
                          vocab_size=32, **ssl_size)
        if spec.paralinguistic == "wavlm":
            ssl = WavLMModel._from_config(WavLMConfig(num_buckets=320, max_bucket_distance=800, **ssl_common),
                                          dtype=dtype)
        else:
            ssl = HubertModel._from_config(HubertConfig(**ssl_common), dtype=dtype)
        ssl.save_pretrained(paths["paralinguistic"])
        # the large SSL checkpoints normalise the waveform and return an attention mask
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=True).save_pretrained(paths["paralinguistic"])

        tokenizer = train_tokenizer(paths["lm"], style=spec.tokenizer_style)
        vocab = spec.real_vocab if scale == "real" else len(tokenizer)
        special = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        if spec.language_model == "qwen2":
            lm = Qwen2ForCausalLM._from_config(
                Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **special, **lm_size), dtype=dtype)
        else:
            lm = LlamaForCausalLM._from_config(
                LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **special, **lm_size), dtype=dtype)
        lm.save_pretrained(paths["lm"], max_shard_size="4GB")
    (out / "recipe_parts.json").write_text(json.dumps({"recipe": str(recipe), "scale": scale, "seed": seed}))
    return {"content_encoder": paths["whisper"], "paralinguistic_encoder": paths["paralinguistic"],
            "language_model": paths["lm"]}
