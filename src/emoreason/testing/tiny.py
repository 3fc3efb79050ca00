"""Build and save a tiny but complete EmoReason model in seconds, offline.

Three component checkpoints in the formats real ones have (a Whisper model + feature extractor, a WavLM model +
feature extractor, a Qwen2 causal LM + a byte-level BPE tokenizer trained here with `tokenizers`) are saved, then
assembled through :func:`emoreason.modeling.build_from_components`, the exact path real checkpoints take, and saved
with ``save_pretrained``. Tests and the demo load the result with ``from_pretrained`` like any checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..data.audio_tokens import DEFAULT_STACK_FACTOR

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_VOCAB_TEXT = """
system user assistant You are an expert in emotion recognition from speech. Listen to the clip.
What emotion does the speaker express? Explain your reasoning, then answer.
<think> </think> <answer> </answer> <distribution> </distribution>
The speaker sounds neutral happy sad angry fearful disgusted surprised calm frustrated contempt other.
The pitch is low normal high, the volume is soft quiet normal loud, the speaking rate is slow normal fast.
Intonation rising falling flat rise-fall fall-rise. The voice is tense relaxed bright dark trembling steady.
pitch energy rate intonation pauses transcript words content tone prosody voice evidence acoustic cues.
female male speaker annotators agree disagree ambiguous mixture probably likely because therefore however.
I can't believe it. We need to talk about the schedule. The meeting starts at nine tomorrow morning.
Please put the boxes near the door. The weather will change later this week. I saw the report on the table.
She opened the window and looked outside. They are coming back on Sunday. Turn left after the second light.
My brother bought a new bicycle. The train leaves in ten minutes. Dinner is ready in the kitchen.
Transcribe the speech. Describe the speaker's voice. Is the pitch high or low? How fast does the speaker talk?
emotion label rationale answer reasoning 0 1 2 3 4 5 6 7 8 9 0.1 0.2 0.5 : , . ? ! " ' ( ) [ ] - /
You write the reasoning of an expert listener who judges the emotion in a speech clip. The clip is given to you as
text: its time span, its transcript, and voice cues measured from the audio. The listener was asked:
Write the listener's answer, following these rules: Reason step by step from the voice cues above (pitch, pitch
variation, volume, speaking rate, intonation, pauses) and from the words of the transcript. Every statement about the
voice must agree with the listed cues; do not invent cues that are not listed. Write as someone who heard the clip.
Never mention annotators, ratings, votes, labels, metadata or this description. Do not start with the emotion; build
up to it and conclude that the emotion is happy. Keep the reasoning between 2 and 6 sentences.
Answer in exactly this format: (your reasoning)
[00:00-00:02] (Gender: female, Pitch: normal, Pitch variation: normal, Volume: loud, Speaking rate: fast,
Intonation: falling, Pauses: fluent, Annotators: angry 4/5, neutral 1/5) 0.80 0.20 0.40 0.60 1.00 0.00
The speaker says What is said is The words are In this clip the speaker says: The wording itself sounds upbeat.
The wording is fairly matter-of-fact, so most of the information is in how it is said. The words alone are plain,
so the delivery matters most. Nothing in the wording is emotional on its own; the voice has to tell.
Its pitch sounds the voice has a pitch the loudness is the volume sounds the pace is the tempo is monotone expressive
the intonation contour is the melody of the sentence is pitch variation is Together, the fit point toward speech.
That is typical of someone who feels. None of the cues is strongly marked, and the overall delivery fits best.
The cues are mixed, but on balance the delivery sounds. It is less typical of, but it does not outweigh the rest.
Only the fits less well with. There is also a trace of in the delivery. Some listeners might hear a little as well.
Overall the speaker sounds. So the emotion is most likely. Weighing these cues, I judge the emotion to be.
Listen carefully to the prosody and the words. What emotion is expressed? How does the speaker feel?
"""


# The chat layout Llama 3.x Instruct tokenizers ship, written out here: the template itself writes the BOS token
# first, and the tokenizer's post-processor adds one too when asked for special tokens (their default).
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TOKENIZER_STYLES = ("chatml", "llama3")


def train_tokenizer(out_dir: Path, vocab_size: int = 1024, style: str = "chatml"):
    """A byte-level BPE tokenizer (any text encodes) trained on a small built-in text, saved like a hub tokenizer.

    ``style="chatml"``: Qwen's special tokens and ChatML, no BOS. ``style="llama3"``: Llama 3.x's special tokens and
    chat layout, and a post-processor that prepends BOS, as Llama-3.1-8B-Instruct's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ValueError(f"tokenizer style must be one of {TOKENIZER_STYLES}, got {style!r}")
    if style == "llama3":
        return _train_llama3_tokenizer(out_dir, vocab_size, Tokenizer, decoders, models, pre_tokenizers, processors,
                                       trainers, PreTrainedTokenizerFast)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _VOCAB_TEXT.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    from ..modeling.processing_emoreason import DEFAULT_CHAT_TEMPLATE

    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _train_llama3_tokenizer(out_dir, vocab_size, Tokenizer, decoders, models, pre_tokenizers, processors, trainers,
                            PreTrainedTokenizerFast):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = [line for line in _VOCAB_TEXT.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 20, trainer=trainer)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token=None,
                                   unk_token=None)
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


# vLLM's CPU attention kernels refuse head_dim < 32 ("Unsupported CPU attention configuration"), so the tiny LM
# gets as many heads as keep head_dim at 32 (hidden 64: 2 heads; 128: 4), with grouped-query attention (KV heads =
# heads / 2, as in Qwen2) wherever there are two heads or more to group.
MIN_HEAD_DIM = 32


def lm_heads(hidden: int) -> tuple[int, int]:
    """(attention heads, KV heads) of the tiny LM for a width: head_dim stays >= MIN_HEAD_DIM."""
    if hidden < MIN_HEAD_DIM or hidden % MIN_HEAD_DIM:
        raise ValueError(f"the tiny LM's width must be a multiple of {MIN_HEAD_DIM} (vLLM's CPU kernels need "
                         f"head_dim >= {MIN_HEAD_DIM}), got hidden={hidden}")
    heads = hidden // MIN_HEAD_DIM
    return heads, max(1, heads // 2)


def build_components(out_dir: str | Path, seed: int = 0, hidden: int = 64) -> dict[str, Path]:
    """Save tiny Whisper, WavLM and Qwen2 checkpoints (random weights) under ``out_dir``; return their paths."""
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        Wav2Vec2FeatureExtractor,
        WavLMConfig,
        WavLMModel,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    out = Path(out_dir)
    torch.manual_seed(seed)
    paths = {name: out / name for name in ("whisper", "wavlm", "lm")}

    whisper_cfg = WhisperConfig(
        vocab_size=128, num_mel_bins=80, d_model=hidden, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, suppress_tokens=[], begin_suppress_tokens=[],
    )
    WhisperForConditionalGeneration(whisper_cfg).save_pretrained(paths["whisper"])
    WhisperFeatureExtractor(feature_size=80).save_pretrained(paths["whisper"])

    wavlm_cfg = WavLMConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32,
        max_bucket_distance=80, feat_extract_norm="group", do_stable_layer_norm=False, layerdrop=0.0,
        mask_time_prob=0.0, vocab_size=32,
    )
    WavLMModel(wavlm_cfg).save_pretrained(paths["wavlm"])
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(paths["wavlm"])

    tokenizer = train_tokenizer(paths["lm"])
    heads, kv_heads = lm_heads(hidden)
    lm_cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    Qwen2ForCausalLM(lm_cfg).save_pretrained(paths["lm"])
    return paths


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden: int = 64, stack_factor: int = DEFAULT_STACK_FACTOR,
                     fusion: str = "concat", random_feature_stats: bool = False) -> Path:
    """Build components, assemble them through ``build_from_components``, save model + processor to ``out_dir``.

    The projector's feature normalisation is left unmeasured (identity; SFT measures it), unless
    ``random_feature_stats``: then seeded non-trivial statistics are installed, so that serving tests exercise the
    normalisation path the way a trained checkpoint does."""
    from ..modeling import build_from_components

    out = Path(out_dir)
    paths = build_components(out / "components", seed=seed, hidden=hidden)
    torch.manual_seed(seed)
    model, processor = build_from_components(
        paths["whisper"], paths["wavlm"], paths["lm"], stack_factor=stack_factor, fusion=fusion
    )
    if random_feature_stats:
        projector = model.get_audio_encoder().projector
        g = torch.Generator().manual_seed(seed + 1)
        projector.set_feature_stats(
            0.5 * torch.randn(projector.content_mean.shape, generator=g),
            0.5 + 1.5 * torch.rand(projector.content_std.shape, generator=g),
            0.5 * torch.randn(projector.paralinguistic_mean.shape, generator=g),
            0.5 + 1.5 * torch.rand(projector.paralinguistic_std.shape, generator=g),
            frames=1,
        )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "emoreason_tiny.json").write_text(json.dumps({"seed": seed, "hidden": hidden, "fusion": fusion}))
    return out


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emoreason make-tiny", description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--stack-factor", type=int, default=DEFAULT_STACK_FACTOR)
    parser.add_argument("--fusion", default="concat", choices=["concat", "sum", "gated"])
    parser.add_argument("--random-feature-stats", action="store_true",
                        help="install seeded feature-normalisation statistics (serving tests); default: unmeasured")
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out_dir, seed=args.seed, hidden=args.hidden, stack_factor=args.stack_factor,
                            fusion=args.fusion, random_feature_stats=args.random_feature_stats)
    print(path)
    return 0
