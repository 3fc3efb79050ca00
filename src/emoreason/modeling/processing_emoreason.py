"""EmoReasonProcessor: Whisper mel features + paralinguistic waveform features + tokenizer + chat template.

Takes waveforms or files (any sample rate, mono or stereo), resamples to 16 kHz, expands each `<audio>` in the text to
the clip's token count (:func:`~emoreason.data.audio_tokens.num_audio_tokens`), and pads a batch to its longest
clip, never to 30 s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin

from ..data.audio import TARGET_SAMPLE_RATE, load_audio, prepare_waveform
from ..data.audio_tokens import (
    AUDIO_TOKEN,
    DEFAULT_STACK_FACTOR,
    HOP_LENGTH,
    MIN_SAMPLES,
    max_samples_for,
    num_audio_tokens,
)

# ChatML, for tokenizers that bring no chat template of their own (the tiny test tokenizer).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

AudioInput = Any  # path | bytes | np.ndarray | torch.Tensor | (array, sampling_rate)


class EmoReasonProcessor(ProcessorMixin):
    def __init__(
        self,
        feature_extractor=None,
        paralinguistic_feature_extractor=None,
        tokenizer=None,
        chat_template: str | None = None,
        audio_token: str = AUDIO_TOKEN,
        stack_factor: int = DEFAULT_STACK_FACTOR,
        max_source_positions: int = 1500,
    ):
        self.audio_token = audio_token
        self.stack_factor = stack_factor
        self.max_source_positions = max_source_positions
        super().__init__(feature_extractor, paralinguistic_feature_extractor, tokenizer, chat_template=chat_template)
        if audio_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [audio_token]})
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)

    # -- sizes ------------------------------------------------------------------------------------------------
    @property
    def max_samples(self) -> int:
        return max_samples_for(self.max_source_positions)

    def num_audio_tokens(self, num_samples: int) -> int:
        return num_audio_tokens(num_samples, self.stack_factor, self.max_source_positions)

    # -- audio ------------------------------------------------------------------------------------------------
    def load(self, item: AudioInput, sampling_rate: int | None = None) -> np.ndarray:
        """One clip as mono float32 at 16 kHz, padded to the minimum and cut to the encoder's window."""
        if isinstance(item, (str, os.PathLike, bytes, bytearray)):
            wav = load_audio(item)
        else:
            if isinstance(item, tuple):
                item, sampling_rate = item
            if isinstance(item, torch.Tensor):
                item = item.detach().cpu().float().numpy()
            wav = prepare_waveform(np.asarray(item), sampling_rate or TARGET_SAMPLE_RATE)
        if wav.shape[0] > self.max_samples:
            wav = wav[: self.max_samples]
        if wav.shape[0] < MIN_SAMPLES:
            wav = np.pad(wav, (0, MIN_SAMPLES - wav.shape[0]))
        return wav

    def audio_features(self, clips: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Batch of 16 kHz clips -> mel (content) and waveform (paralinguistic) tensors, padded to the longest."""
        mels = []
        for wav in clips:
            mel = self.feature_extractor(
                wav, sampling_rate=TARGET_SAMPLE_RATE, padding="longest", truncation=False, return_tensors="np"
            )["input_features"][0]
            mels.append(mel[:, : wav.shape[0] // HOP_LENGTH])
        max_frames = max(m.shape[1] for m in mels)
        input_features = np.zeros((len(mels), mels[0].shape[0], max_frames), dtype=np.float32)
        input_features_mask = np.zeros((len(mels), max_frames), dtype=np.int64)
        for i, mel in enumerate(mels):
            input_features[i, :, : mel.shape[1]] = mel
            input_features_mask[i, : mel.shape[1]] = 1
        max_len = max(w.shape[0] for w in clips)
        pad_value = float(getattr(self.paralinguistic_feature_extractor, "padding_value", 0.0))
        input_values = np.full((len(clips), max_len), pad_value, dtype=np.float32)
        input_values_mask = np.zeros((len(clips), max_len), dtype=np.int64)
        normalize = getattr(self.paralinguistic_feature_extractor, "do_normalize", True)
        for i, wav in enumerate(clips):
            if normalize:
                wav = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)
            input_values[i, : wav.shape[0]] = wav
            input_values_mask[i, : wav.shape[0]] = 1
        return {
            "input_features": torch.from_numpy(input_features),
            "input_features_mask": torch.from_numpy(input_features_mask),
            "input_values": torch.from_numpy(input_values),
            "input_values_mask": torch.from_numpy(input_values_mask),
        }

    # -- text + audio -----------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        audio: AudioInput | Sequence[AudioInput] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        """Each `<audio>` in ``text`` (in order, across rows) takes the next clip of ``audio``."""
        if text is None:
            raise ValueError("text is required; put one `<audio>` where each clip goes")
        texts = [text] if isinstance(text, str) else list(text)
        if audio is None:
            clips: list[np.ndarray] = []
        elif isinstance(audio, (list, tuple)) and not (
            isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[1], int)
        ):
            clips = [self.load(a, sampling_rate) for a in audio]
        else:
            clips = [self.load(audio, sampling_rate)]
        placeholders = sum(t.count(self.audio_token) for t in texts)
        if placeholders != len(clips):
            raise ValueError(
                f"the text has {placeholders} `{self.audio_token}` placeholder(s) but {len(clips)} audio clip(s) were "
                "given; put exactly one placeholder per clip"
            )
        counts = iter([self.num_audio_tokens(c.shape[0]) for c in clips])
        expanded = [
            "".join(
                part if i == 0 else self.audio_token * next(counts) + part
                for i, part in enumerate(t.split(self.audio_token))
            )
            for t in texts
        ]
        expanded, tokenizer_kwargs = self._one_bos(expanded, tokenizer_kwargs)
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)
        data = dict(encoded)
        if clips:
            data.update(self.audio_features(clips))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _one_bos(self, texts: list[str], tokenizer_kwargs: dict) -> tuple[list[str], dict]:
        """Text rendered by a chat template that writes the BOS token itself (Llama 3.x) must not get a second one
        from a tokenizer that also adds it (as Llama 3.x's does): such rows are tokenized without special tokens, as
        the training collators tokenize them, so prompts in training, GRPO rollouts and serving are the same ids."""
        bos = self.tokenizer.bos_token
        if not bos or "add_special_tokens" in tokenizer_kwargs:
            return texts, tokenizer_kwargs
        starts = [t.startswith(bos) for t in texts]
        if all(starts):
            return texts, {**tokenizer_kwargs, "add_special_tokens": False}
        # mixed rows: let the tokenizer's own rule give every row the same start
        return [t[len(bos):] if s else t for t, s in zip(texts, starts)], tokenizer_kwargs

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """Render messages whose content may be a list of parts ({"type": "text"} / {"type": "audio"}).

        Audio parts become the `<audio>` placeholder; the text then goes through the language model's own chat
        template (or ChatML when it has none), so any LLM family keeps its native format.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        flat = [[{**m, "content": self._flatten_content(m.get("content"))} for m in conv] for conv in conversations]
        template = chat_template or self.chat_template or self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        kwargs.setdefault("tokenize", False)
        rendered = self.tokenizer.apply_chat_template(flat, chat_template=template, **kwargs)
        return rendered if batched else rendered[0]

    def _flatten_content(self, content) -> str:
        if content is None or isinstance(content, str):
            return content or ""
        pieces = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                pieces.append(part.get("text", ""))
            elif kind in ("audio", "input_audio", "audio_url"):
                pieces.append(self.audio_token)
            else:
                raise ValueError(f"unsupported content part type {kind!r}; expected 'text' or 'audio'")
        return "\n".join(p for p in pieces if p)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "input_features_mask", "input_values",
                "input_values_mask"]

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load the processor; in a checkpoint folder the model's ``config.json`` is the authority on the audio
        token rule (``stack_factor`` and the content encoder's window): a processor saved with other values would
        expand `<audio>` to a token count the model does not produce, so that is an error naming both files."""
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        processor.check_model_config(pretrained_model_name_or_path)
        return processor

    def check_model_config(self, folder) -> None:
        """Raise if ``folder``'s model config (an emoreason ``config.json``) has another audio token rule."""
        config_file = Path(folder) / "config.json"
        if not config_file.is_file():
            return
        config = json.loads(config_file.read_text())
        if config.get("model_type") != "emoreason":
            return
        expected = {"stack_factor": config.get("stack_factor", DEFAULT_STACK_FACTOR),
                    "max_source_positions": (config.get("content_config") or {}).get("max_source_positions",
                                                                                    self.max_source_positions)}
        found = {"stack_factor": self.stack_factor, "max_source_positions": self.max_source_positions}
        wrong = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
        if wrong:
            detail = ", ".join(f"{k} {got} (config.json: {want})" for k, (got, want) in wrong.items())
            raise ValueError(f"{Path(folder) / 'processor_config.json'}: {detail}; the processor and the model of one "
                             "checkpoint must share the audio token rule (save both from the same run, or fix the "
                             "processor's value)")

    # -- assembly ---------------------------------------------------------------------------------------------
    @classmethod
    def from_components(
        cls,
        content_encoder: str | os.PathLike,
        paralinguistic_encoder: str | os.PathLike,
        language_model: str | os.PathLike,
        stack_factor: int = DEFAULT_STACK_FACTOR,
        chat_template: str | None = None,
    ) -> EmoReasonProcessor:
        from transformers import WhisperConfig, WhisperFeatureExtractor

        tokenizer = AutoTokenizer.from_pretrained(language_model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(
            feature_extractor=WhisperFeatureExtractor.from_pretrained(content_encoder),
            paralinguistic_feature_extractor=AutoFeatureExtractor.from_pretrained(paralinguistic_encoder),
            tokenizer=tokenizer,
            chat_template=chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE,
            stack_factor=stack_factor,
            max_source_positions=WhisperConfig.from_pretrained(content_encoder).max_source_positions,
        )


__all__ = ["EmoReasonProcessor", "AUDIO_TOKEN", "DEFAULT_CHAT_TEMPLATE"]
