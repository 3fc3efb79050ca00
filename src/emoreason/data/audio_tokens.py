"""How many `<audio>` tokens a clip becomes: a pure function of its length, shared by the processor, the model and
the vLLM plugin (so all three always agree). Dependency-free on purpose.

Whisper turns 16 kHz audio into 10 ms mel frames (hop 160); its second convolution halves that to 50 Hz encoder
frames; the projector stacks ``stack_factor`` frames into one token. Clips shorter than ``MIN_SAMPLES`` are padded
to it, longer than the encoder's window are cut to it.
"""

from __future__ import annotations

import math

AUDIO_TOKEN = "<audio>"  # the placeholder a clip's tokens replace (the processor expands one per clip)
SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # samples per mel frame
MIN_SAMPLES = SAMPLE_RATE // 10  # 0.1 s: every clip yields at least one token
DEFAULT_STACK_FACTOR = 4  # encoder frames (50 Hz) per audio token: 12.5 tokens per second


def max_samples_for(max_source_positions: int) -> int:
    """Longest clip (in samples) a Whisper encoder with this position table encodes (1500 -> 30 s)."""
    return max_source_positions * 2 * HOP_LENGTH


def effective_num_samples(num_samples: int, max_source_positions: int = 1500) -> int:
    return max(MIN_SAMPLES, min(int(num_samples), max_samples_for(max_source_positions)))


def num_mel_frames(num_samples: int, max_source_positions: int = 1500) -> int:
    return effective_num_samples(num_samples, max_source_positions) // HOP_LENGTH


def num_encoder_frames_from_mel(mel_frames):
    # conv2: kernel 3, stride 2, padding 1. Works on ints and integer tensors alike.
    return (mel_frames - 1) // 2 + 1


def num_audio_tokens_from_mel(mel_frames: int, stack_factor: int) -> int:
    return math.ceil(num_encoder_frames_from_mel(mel_frames) / stack_factor)


def num_audio_tokens(num_samples: int, stack_factor: int, max_source_positions: int = 1500) -> int:
    """`<audio>` tokens for a clip of ``num_samples`` samples at 16 kHz."""
    return num_audio_tokens_from_mel(num_mel_frames(num_samples, max_source_positions), stack_factor)


def num_audio_tokens_for_duration(seconds: float, stack_factor: int, max_source_positions: int = 1500) -> int:
    return num_audio_tokens(round(seconds * SAMPLE_RATE), stack_factor, max_source_positions)
