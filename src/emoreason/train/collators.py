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
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..data.audio import TARGET_SAMPLE_RATE
from ..data.audio_tokens import HOP_LENGTH, MIN_SAMPLES, num_encoder_frames_from_mel
from ..data.conversation import build_conversation
from ..data.schema import resolve_under_root

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# Samples per 50 Hz encoder frame (two mel frames: Whisper's second convolution has stride 2), and the frames of the
# shortest clip the processor encodes as is (it pads shorter ones, which would change their token count).
SAMPLES_PER_FRAME = 2 * HOP_LENGTH
MIN_FRAMES = num_encoder_frames_from_mel(MIN_SAMPLES // HOP_LENGTH)


@dataclass(frozen=True)
class FeatureAugment:
    """Training-time augmentation of cached tower states (``emoreason cache-features``), drawn afresh for every batch,
    so that a model cannot learn a clip by heart from the exact frames it saw last epoch.

    - ``crop``: each clip keeps a random contiguous window of at least this fraction of its frames (1: whole clip),
      in both streams, and its sample count (hence its number of `<audio>` tokens) shrinks to match;
    - ``time_mask``: that fraction of each clip's frames, in spans of ``mask_span`` frames, is replaced by the clip's
      mean frame in both streams;
    - ``noise``: Gaussian noise with this many per-clip, per-dimension standard deviations is added to both streams;
    - ``content_dropout``: with this probability a clip's content stream (the Whisper states: what is said) is
      replaced by its time average, so the label must then come from the paralinguistic stream.

    Batches computed live (a clip missing from the cache) are not augmented.
    """

    crop: float = 1.0
    time_mask: float = 0.0
    mask_span: int = 5
    noise: float = 0.0
    content_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.crop <= 1.0:
            raise ValueError(f"feature augmentation: crop must be in (0, 1], got {self.crop}")
        if not 0.0 <= self.time_mask < 1.0:
            raise ValueError(f"feature augmentation: time_mask must be in [0, 1), got {self.time_mask}")
        if self.mask_span < 1:
            raise ValueError(f"feature augmentation: mask_span must be >= 1, got {self.mask_span}")
        if self.noise < 0.0:
            raise ValueError(f"feature augmentation: noise must be >= 0, got {self.noise}")
        if not 0.0 <= self.content_dropout <= 1.0:
            raise ValueError(f"feature augmentation: content_dropout must be in [0, 1], got {self.content_dropout}")

    @property
    def active(self) -> bool:
        return self.crop < 1.0 or self.time_mask > 0 or self.noise > 0 or self.content_dropout > 0

    def __call__(self, cached: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Augment a padded batch from :meth:`FeatureLookup.lookup` (content (B, T, Dc), paralinguistic
        ((layers,) B, L, Dp), num_samples); returns a new batch of the same layout."""
        content = cached["content_states"]
        para = cached["paralinguistic_states"]
        layered = para.dim() == 4
        if not layered:
            para = para.unsqueeze(0)
        contents, paras, samples = [], [], []
        for i, n in enumerate(cached["num_samples"]):
            frames = max(1, min(content.shape[1], num_encoder_frames_from_mel(int(n) // HOP_LENGTH)))
            c = content[i, :frames]
            p = para[:, i, : min(frames, para.shape[2])]
            keep = frames
            if self.crop < 1.0 and frames > 1:
                # at least MIN_FRAMES (0.1 s, the shortest clip the processor encodes as is)
                low = max(min(frames, MIN_FRAMES), math.ceil(self.crop * frames))
                keep = int(torch.randint(low, frames + 1, (1,), generator=generator))
                start = int(torch.randint(0, frames - keep + 1, (1,), generator=generator))
                c, p = c[start : start + keep], p[:, start : start + keep]
                n = min(int(n), keep * SAMPLES_PER_FRAME)
            if self.content_dropout > 0 and float(torch.rand((), generator=generator)) < self.content_dropout:
                c = c.mean(0, keepdim=True).expand_as(c)
            if self.time_mask > 0 and keep > 1:
                masked = torch.zeros(keep, dtype=torch.bool)
                for _ in range(math.ceil(self.time_mask * keep / self.mask_span)):
                    s = int(torch.randint(0, max(1, keep - self.mask_span + 1), (1,), generator=generator))
                    masked[s : s + self.mask_span] = True
                c = torch.where(masked[:, None], c.mean(0, keepdim=True), c)
                pm = masked[: p.shape[1]]
                p = torch.where(pm[None, :, None], p.mean(1, keepdim=True), p)
            if self.noise > 0:
                c = c + self.noise * c.std(0, keepdim=True) * torch.randn(c.shape, generator=generator)
                if p.shape[1] > 1:
                    p = p + self.noise * p.std(1, keepdim=True) * torch.randn(p.shape, generator=generator)
            contents.append(c)
            paras.append(p.transpose(0, 1))  # (L, layers, Dp)
            samples.append(int(n))
        content = torch.nn.utils.rnn.pad_sequence(contents, batch_first=True)
        para = torch.nn.utils.rnn.pad_sequence(paras, batch_first=True).permute(2, 0, 1, 3).contiguous()
        return {"content_states": content.contiguous(), "paralinguistic_states": para if layered else para[0],
                "num_samples": samples}


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

    ``packing=True`` makes the batch padding-free (transformers' flattening-collator layout): the examples are laid end
    to end in ONE row with ``position_ids`` restarting at 0 per example and no ``attention_mask``, plus the sequence
    boundaries flash-attention's varlen kernels take (``cu_seq_lens_q/k``, ``max_length_q/k``, computed here on the
    CPU). transformers (5.23) turns restarting position ids into a block-diagonal causal mask for sdpa and eager
    attention, so no example attends to another; each clip stays its own row of the audio batch and fills its own
    example's placeholders. The loss is the same as the padded batch's; no compute goes to padding.
    """

    def __init__(self, processor, data_root: str | Path = ".", max_length: int | None = None,
                 system_prompt: str | None = None, feature_cache: FeatureLookup | None = None,
                 silence_seconds: float | None = None, feature_augment: FeatureAugment | None = None,
                 instruction_pools: Mapping[str, Sequence[str]] | None = None, seed: int = 0,
                 packing: bool = False):
        self.processor = processor
        self.packing = packing
        self.tokenizer = processor.tokenizer
        self.data_root = Path(data_root)
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.feature_cache = feature_cache
        self.silence_seconds = silence_seconds
        self.feature_augment = feature_augment if feature_augment is not None and feature_augment.active else None
        self._generator = torch.Generator().manual_seed(feature_augment.seed) if self.feature_augment else None
        # {task: pool}: a row whose instruction came from its task's pool gets a fresh draw from it every batch
        self.instruction_pools = {k: list(v) for k, v in (instruction_pools or {}).items() if v}
        self._instruction_rng = random.Random(f"{seed}:instructions")
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

    def redraw_instruction(self, example: Mapping[str, Any]) -> Mapping[str, Any]:
        pool = self.instruction_pools.get(example.get("task"))
        if not pool or example["instruction"] not in pool:  # a record's own instruction (datagen) is kept
            return example
        return {**example, "instruction": self._instruction_rng.choice(pool)}

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
                if self.feature_augment is not None:
                    cached = self.feature_augment(cached, self._generator)
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
        if self.instruction_pools:
            examples = [self.redraw_instruction(e) for e in examples]
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
        if self.packing:
            return {**pack_rows(rows, labels), **audio}
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


def pack_rows(rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Token rows -> one padding-free row: ``input_ids``, ``labels`` (each example's first label ignored, so no example
    is scored on predicting the next one's start), ``position_ids`` restarting per example, and the sequence boundaries
    of flash-attention's varlen kernels. No ``attention_mask``: with one, transformers would ignore the boundaries."""
    lengths = [len(r) for r in rows]
    input_ids = torch.tensor([t for r in rows for t in r], dtype=torch.long)[None]
    label_ids = torch.tensor([t for lab in labels for t in lab], dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])[None]
    label_ids[position_ids == 0] = IGNORE_INDEX
    cu_seq_lens = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return {"input_ids": input_ids, "labels": label_ids, "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths), "max_length_k": max(lengths)}


def _length_mask(lengths: Sequence[int]) -> torch.Tensor:
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    return (torch.arange(int(lengths_t.max()))[None, :] < lengths_t[:, None]).long()
