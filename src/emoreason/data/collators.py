"""Collators: dataset rows (see :func:`emoreason.train.tasks.example_from_record`) -> model batches.

:class:`SFTCollator` renders each row as the conversation every stage shares
(:func:`emoreason.data.conversation.build_conversation`: user = the clip + dialogue context + instruction; assistant =
the response) with the processor's chat template, expands the clip's `<audio>` placeholder to its token count, tokenizes prompt and
completion separately (so the loss mask is exact whatever the tokenizer merges) and right-pads. Labels are -100 on the
prompt, the audio and the padding: the loss is on the response only. Audio is loaded from ``data_root`` (paths stay
under it) and batched by the processor, padded to the longest clip of the batch, never to 30 s.

With a feature cache (``emoreason cache-features``), a batch whose clips are all cached carries the precomputed tower
outputs (``content_states`` / ``paralinguistic_states``) and their masks instead of audio: no decoding, no towers. A
batch with any clip missing from the cache falls back to live audio.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .audio import TARGET_SAMPLE_RATE
from .conversation import build_conversation
from .schema import resolve_under_root

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class FeatureLookup(Protocol):
    def lookup(self, clip_ids: Sequence[str]) -> dict[str, Any] | None:
        """Padded ``content_states`` / ``paralinguistic_states`` + ``num_samples`` per clip, or None if any is missing."""


class SFTCollator:
    """Rows with ``audio`` (relative path), ``instruction``, ``response`` (and ``clip_id`` for the feature cache) ->
    ``input_ids``, ``attention_mask``, ``labels`` + audio tensors (or cached tower states).

    ``max_length`` truncates the response, never the prompt: a prompt (with its audio tokens) longer than
    ``max_length`` is an error naming the row, because cutting audio tokens would desynchronise them from the clip.
    ``silence_seconds`` replaces every clip by that many seconds of zeros (the no-audio control of the learning
    test). The length is fixed on purpose: silence as long as the clip would still tell the model the clip's duration
    (through its number of audio tokens), and duration alone predicts the speaking rate, hence the emotion, in part.
    """

    def __init__(self, processor, data_root: str | Path = ".", max_length: int | None = None,
                 system_prompt: str | None = None, feature_cache: FeatureLookup | None = None,
                 silence_seconds: float | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.data_root = Path(data_root)
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.feature_cache = feature_cache
        self.silence_seconds = silence_seconds
        self.cache_hits = 0
        self.cache_misses = 0
        # Samples per mel frame, from the processor's own feature extractor (data never imports modeling).
        self.hop_length = int(processor.feature_extractor.hop_length)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (e.g. the eos token) before training")

    # -- text -------------------------------------------------------------------------------------------------
    def messages(self, example: Mapping[str, Any], response: str | None = None) -> list[dict[str, Any]]:
        """The row's conversation (the prompt builder every stage shares), with ``response`` as the assistant turn."""
        return build_conversation(example["instruction"], context=example.get("context") or (),
                                  system_prompt=self.system_prompt, response=response)

    def render(self, example: Mapping[str, Any]) -> tuple[str, str]:
        """(prompt text with one `<audio>`, completion text including the end-of-turn marker)."""
        prompt = self.processor.apply_chat_template(self.messages(example), add_generation_prompt=True)
        full = self.processor.apply_chat_template(self.messages(example, example["response"]))
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        # Templates that rewrite earlier turns (e.g. stripping reasoning) break the prefix property.
        return prompt, example["response"] + (self.tokenizer.eos_token or "")

    # -- audio ------------------------------------------------------------------------------------------------
    def load_clip(self, example: Mapping[str, Any]) -> np.ndarray:
        path = resolve_under_root(example["audio"], self.data_root, record=example.get("clip_id") or example.get("id"))
        if self.silence_seconds is not None:
            return self.processor.load(np.zeros(int(self.silence_seconds * TARGET_SAMPLE_RATE), dtype=np.float32))
        return self.processor.load(str(path))

    def audio_inputs(self, examples: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Samples per clip and the audio part of the batch (cached tower states when every clip is cached)."""
        if self.feature_cache is not None and self.silence_seconds is None:
            cached = self.feature_cache.lookup([e.get("clip_id") or e["id"] for e in examples])
            if cached is not None:
                self.cache_hits += 1
                num_samples = [int(n) for n in cached["num_samples"]]
                mel = [n // self.hop_length for n in num_samples]
                batch = {
                    "content_states": cached["content_states"],
                    "paralinguistic_states": cached["paralinguistic_states"],
                    "input_features_mask": _length_mask(mel),
                    "input_values_mask": _length_mask(num_samples),
                }
                return num_samples, batch
            self.cache_misses += 1
        clips = [self.load_clip(e) for e in examples]
        return [c.shape[0] for c in clips], dict(self.processor.audio_features(clips))

    # -- batch ------------------------------------------------------------------------------------------------
    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        num_samples, audio = self.audio_inputs(examples)
        token = self.processor.audio_token
        prompts, completions = [], []
        for example, n in zip(examples, num_samples):
            prompt, completion = self.render(example)
            if prompt.count(token) != 1:
                raise ValueError(f"row {example.get('id')}: the prompt must hold exactly one {token}; "
                                 "remove it from the instruction")
            prompts.append(prompt.replace(token, token * self.processor.num_audio_tokens(n)))
            completions.append(completion)
        prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        completion_ids = self.tokenizer(completions, add_special_tokens=False)["input_ids"]
        rows, labels = [], []
        for example, p, c in zip(examples, prompt_ids, completion_ids):
            if self.max_length is not None:
                if len(p) >= self.max_length:
                    raise ValueError(
                        f"row {example.get('id')}: the prompt alone is {len(p)} tokens (audio included), "
                        f"max_length is {self.max_length}; raise max_length or shorten the clip"
                    )
                c = c[: self.max_length - len(p)]
            rows.append(p + c)
            labels.append([IGNORE_INDEX] * len(p) + c)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            label_ids[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids, **audio}


def _length_mask(lengths: Sequence[int]) -> torch.Tensor:
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    return (torch.arange(int(lengths_t.max()))[None, :] < lengths_t[:, None]).long()
