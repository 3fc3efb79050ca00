"""Records -> chat conversations: the one prompt builder that SFT, GRPO, DPO and the evaluator call.

A conversation is OpenAI-shaped: an optional system turn (one text part), one user turn whose content is the clip's
audio part followed by one text part, and, for supervised targets, the assistant's response. The text part holds the
record's dialogue context (one ``Context: ...`` line per prior turn, oldest first; MELD and IEMOCAP have it) and then
the instruction. Stages differ only in the audio part they put in:

- training collators render ``{"type": "audio"}``, which the processor's chat template turns into `<audio>`;
- GRPO prompts carry the clip's path, ``{"type": "audio", "audio": "/data/clip.wav"}`` (the trainer loads it);
- the evaluator sends the bytes, ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}``
  (:func:`input_audio_part`), or a ``file://`` URL to a server that shares the disk.

The instruction is the record's own when ``datagen`` wrote one for the task, else drawn from the task's pool
(:func:`choose_instruction`), so one recipe yields the same prompts in every stage.
"""

from __future__ import annotations

import base64
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .audio import encode_wav, load_audio
from .schema import EmotionRecord

# -- instruction pools (the defaults a recipe's task can replace) ------------------------------------------------
INSTRUCTION_POOLS: dict[str, tuple[str, ...]] = {
    "emotion_reasoning": (
        "What emotion does the speaker express? Explain your reasoning from the voice and the words, then answer.",
        "Listen to the clip. Reason about the speaker's tone, pitch, energy and pace, then name the emotion.",
        "Which emotion is in this voice? Think about the acoustic cues and the transcript before answering.",
        "Describe the evidence for the speaker's emotional state, then give your answer.",
    ),
    "emotion_label": (
        "What emotion does the speaker express? Answer with one word.",
        "Name the speaker's emotion.",
        "Which emotion do you hear in this voice? Reply with the emotion only.",
        "Classify the emotion of the speech.",
    ),
    "transcription": (
        "Transcribe the speech.",
        "Write down exactly what the speaker says.",
        "What are the words in this clip?",
    ),
    "prosody.pitch": (
        "Is the speaker's pitch low, normal or high?",
        "How high is the speaker's voice? Answer low, normal or high.",
    ),
    "prosody.energy": (
        "Is the speaker's voice soft, normal or loud?",
        "How loud does the speaker talk? Answer soft, normal or loud.",
    ),
    "prosody.rate": (
        "Does the speaker talk slowly, at a normal pace or fast?",
        "How fast does the speaker talk? Answer slow, normal or fast.",
    ),
    "captioning": (
        "Describe the speaker's voice.",
        "Write a one-sentence caption of how this clip sounds.",
        "Describe the speech: who speaks, how, and with which emotion.",
    ),
}

DEFAULT_TASK = "emotion_reasoning"  # the task of a record that names none (what datagen writes by default)


def choose_instruction(record: EmotionRecord, task: str, pool: Sequence[str], rng: random.Random) -> str:
    """The record's own instruction when it was written for ``task`` (a record without a task counts as
    ``emotion_reasoning``), else one drawn from ``pool`` with ``rng`` (drawn only then, so seeds stay stable)."""
    if record.instruction and (record.task or DEFAULT_TASK) == task:
        return record.instruction
    if not pool:
        raise ValueError(f"task {task!r}: empty instruction pool")
    return rng.choice(list(pool))


# -- the conversation ------------------------------------------------------------------------------------------
def audio_placeholder(clip: str | os.PathLike | None = None) -> dict[str, Any]:
    """The training audio part: ``{"type": "audio"}``, with ``audio`` set to the clip's path when given."""
    return {"type": "audio"} if clip is None else {"type": "audio", "audio": str(clip)}


def user_text(instruction: str, context: Sequence[str] = ()) -> str:
    """The user turn's text: one ``Context: ...`` line per prior dialogue turn, then the instruction."""
    return "\n".join([*(f"Context: {turn}" for turn in context), instruction])


def build_conversation(instruction: str, *, context: Sequence[str] = (), system_prompt: str | None = None,
                       audio: Mapping[str, Any] | None = None, response: str | None = None) -> list[dict[str, Any]]:
    """Messages for one clip: [system], user (audio part, then context + instruction), [assistant response]."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("a conversation needs a non-empty instruction")
    messages: list[dict[str, Any]] = []
    if system_prompt:
        # Every turn's content is a list of parts: Arrow (GRPO/DPO datasets) cannot mix text and list contents.
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    part = dict(audio) if audio is not None else audio_placeholder()
    messages.append({"role": "user", "content": [part, {"type": "text", "text": user_text(instruction, context)}]})
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


def record_conversation(record: EmotionRecord, instruction: str, *, system_prompt: str | None = None,
                        audio: Mapping[str, Any] | None = None, response: str | None = None) -> list[dict[str, Any]]:
    """:func:`build_conversation` for a record: its dialogue context goes in with the instruction."""
    return build_conversation(instruction, context=record.context, system_prompt=system_prompt, audio=audio,
                              response=response)


# -- the OpenAI audio part -------------------------------------------------------------------------------------
# OpenAI's chat API takes `input_audio` in these formats only; anything else is decoded and sent as 16 kHz WAV.
INPUT_AUDIO_FORMATS = ("wav", "mp3")


def _sniff_format(raw: bytes) -> str | None:
    if raw[:4] == b"RIFF" and raw[8:12] == b"WAVE":
        return "wav"
    if raw[:3] == b"ID3" or (len(raw) > 1 and raw[0] == 0xFF and raw[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def input_audio_part(source: str | os.PathLike | bytes, fmt: str | None = None) -> dict[str, Any]:
    """The ``input_audio`` content part for a file or encoded bytes: WAV and MP3 go as they are, other formats
    (FLAC, OGG, ...) are decoded and re-encoded as 16 kHz mono WAV. The format is read from the bytes themselves
    (a file's suffix can lie) unless ``fmt`` names it. Audio that cannot be decoded raises
    :class:`~emoreason.data.audio.AudioError` with the reason."""
    raw = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    fmt = (fmt or _sniff_format(raw) or "").lower()
    fmt = {"mpeg": "mp3", "wave": "wav"}.get(fmt, fmt)
    if fmt not in INPUT_AUDIO_FORMATS:
        raw, fmt = encode_wav(load_audio(raw if isinstance(source, (bytes, bytearray)) else source)), "wav"
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode("ascii"), "format": fmt}}


__all__ = [
    "INSTRUCTION_POOLS", "INPUT_AUDIO_FORMATS", "DEFAULT_TASK", "audio_placeholder", "build_conversation",
    "choose_instruction", "input_audio_part", "record_conversation", "user_text",
]
