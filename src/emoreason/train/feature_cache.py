"""Cached encoder features: run the frozen towers once, train many epochs on their outputs.

    emoreason cache-features --config recipes/<model>/sft.yaml [--feature_cache_dir DIR] [--field value ...]
    (the command line lives in emoreason.train.cli: it parses the SFT recipe)

When both encoders are frozen, what they output for a clip never changes, so a training step only needs the projector
and the language model. This command encodes every clip of the recipe's records once, as if **alone** (in batches
of clips sorted by length: Whisper masks padded frames and group-norm WavLM/HuBERT layers normalise each clip over its
own frames, so a clip's states do not depend on its batch) and stores the content states and the paralinguistic
states in safetensors shards:

    DIR/<fingerprint>/shard-00000.safetensors    "<clip id>/content", "<clip id>/paralinguistic", "<clip id>/num_samples"
    DIR/<fingerprint>/index.json                 {clip id: shard file}
    DIR/<fingerprint>/fingerprint.json           what the fingerprint covers

The fingerprint hashes both towers' configs, their weights and the feature extractors' settings: any change to an
encoder gives a new folder, so stale features are never read (the old folder can be deleted). Training with
``feature_cache_dir`` set looks the fingerprint of the model it loaded up; a batch with a clip missing from the cache
is computed live. The command resumes: clips already in the index are skipped, shards are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..data.audio_tokens import num_encoder_frames_from_mel
from ..data.schema import EmotionRecord, resolve_under_root
from ..modeling.audio_encoder import EmoReasonAudioEncoder

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
INDEX_FILE = "index.json"


# -- fingerprint ----------------------------------------------------------------------------------------------
def encoder_fingerprint(model, processor=None) -> str:
    """Hex digest of everything the cached states depend on: tower configs + weights, layer weighting, and the
    processor's feature settings. Weights are hashed in full (a few seconds for billion-parameter towers)."""
    inner = audio_encoder_of(model)
    config = inner.config
    digest = hashlib.sha256()
    described = {
        "version": CACHE_FORMAT_VERSION,
        "content": config.content_config.to_dict(),
        "paralinguistic": config.paralinguistic_config.to_dict(),
        "weighted_layers": bool(config.paralinguistic_weighted_layers),
    }
    if processor is not None:
        described["feature_extractor"] = processor.feature_extractor.to_dict()
        described["paralinguistic_feature_extractor"] = processor.paralinguistic_feature_extractor.to_dict()
        described["max_source_positions"] = processor.max_source_positions
    for volatile in ("_name_or_path", "transformers_version", "architectures", "layerdrop"):
        for key in ("content", "paralinguistic"):
            described[key].pop(volatile, None)
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for tower in (inner.content_encoder, inner.paralinguistic_encoder):
        for name, tensor in sorted(tower.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def audio_encoder_of(model) -> EmoReasonAudioEncoder:
    """The audio encoder of a (PEFT-wrapped) EmoReason model, or ``model`` itself when it is one."""
    return model if isinstance(model, EmoReasonAudioEncoder) else model.get_audio_encoder()


# -- reading --------------------------------------------------------------------------------------------------
class FeatureCache:
    """Read side: clip ids -> padded tower states for :class:`~emoreason.train.collators.SFTCollator`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index_file = self.folder / INDEX_FILE
        self.index: dict[str, str] = json.loads(index_file.read_text()) if index_file.is_file() else {}
        self._handles: dict[str, Any] = {}

    @classmethod
    def for_model(cls, cache_dir: str | os.PathLike, model, processor=None) -> FeatureCache:
        """The cache matching ``model``'s encoders; an empty one (every lookup misses) when none was computed."""
        inner = audio_encoder_of(model)
        if inner.config.train_content_encoder or inner.config.train_paralinguistic_encoder:
            raise ValueError("feature_cache_dir is set but an encoder is trainable: cached features would be stale "
                             "after the first step; unset feature_cache_dir or freeze the encoders")
        fingerprint = encoder_fingerprint(model, processor)
        cache = cls(Path(cache_dir) / fingerprint)
        if not cache.index:
            logger.warning("no cached features for encoder fingerprint %s under %s: computing features live "
                           "(run `emoreason cache-features` with this recipe to build them)", fingerprint, cache_dir)
        else:
            logger.info("feature cache %s: %d clips", cache.folder, len(cache.index))
        return cache

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self.index

    def __getstate__(self):  # DataLoader workers get their own file handles
        return {**self.__dict__, "_handles": {}}

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard]

    def get(self, clip_id: str) -> dict[str, torch.Tensor]:
        handle = self._handle(self.index[clip_id])
        return {k: handle.get_tensor(f"{clip_id}/{k}") for k in ("content", "paralinguistic", "num_samples")}

    def lookup(self, clip_ids: Sequence[str]) -> dict[str, Any] | None:
        """Padded batch of states for ``clip_ids``, or None when any clip is not cached."""
        if not all(c in self.index for c in clip_ids):
            return None
        items = [self.get(c) for c in clip_ids]
        content = _pad([i["content"] for i in items], time_dim=0)  # (B, T, Dc)
        para = [i["paralinguistic"] for i in items]
        if para[0].dim() == 3:  # (layers, L, Dp) per clip -> (layers, B, L, Dp)
            paralinguistic = _pad([p.transpose(0, 1) for p in para], time_dim=0).permute(2, 0, 1, 3).contiguous()
        else:
            paralinguistic = _pad(para, time_dim=0)
        return {"content_states": content, "paralinguistic_states": paralinguistic,
                "num_samples": [int(i["num_samples"]) for i in items]}


def _pad(tensors: Sequence[torch.Tensor], time_dim: int = 0) -> torch.Tensor:
    """Stack clips of different lengths (time first) with zeros after each clip's end."""
    return torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True)


# -- writing --------------------------------------------------------------------------------------------------
# Clips per tower call. On an accelerator each call costs a fixed host time (~340 operator launches per clip at
# 64 clips per call, ~11,200 one clip at a time: the first GPU run's 6 clips/s): batch wide. On a CPU the towers are
# compute-bound and padding costs compute: batch narrow (8 clips: 1.6x one at a time on the proxy towers).
ENCODE_BATCH = {"cpu": 8}
ENCODE_BATCH_ACCELERATOR = 128
ENCODE_BATCH_SAMPLES = 32 * 30 * 16_000  # and at most this much padded audio (32 clips of 30 s) per call


def encode_batch_size(model) -> int:
    device = audio_encoder_of(model).device
    return ENCODE_BATCH.get(device.type, ENCODE_BATCH_ACCELERATOR)


@torch.no_grad()
def encode_clips(model, processor, wavs: Sequence) -> list[dict[str, torch.Tensor]]:
    """The tower outputs of each clip, as if encoded alone, for a batch of clips in ONE call per tower: content
    (T, Dc), paralinguistic ((layers, L, Dp) or (L, Dp)), num_samples. Each clip's frames are cut at its own length;
    Whisper masks padded frames and group-norm SSL encoders normalise each clip over its own frames, so a clip's states
    do not depend on its batch (to float rounding: tested against :func:`encode_clip`)."""
    inner = audio_encoder_of(model)
    device = inner.device
    feats = {k: v.to(device) for k, v in processor.audio_features(list(wavs)).items()}
    mel_lengths = feats["input_features_mask"].sum(-1).long()
    host_mel = mel_lengths.tolist()
    host_samples = feats["input_values_mask"].sum(-1).tolist()
    content = inner.encode_content(feats["input_features"], mel_lengths, host_mel)
    para, para_lengths = inner.encode_paralinguistic(feats["input_values"], feats["input_values_mask"], host_samples)
    content, para, para_lengths = content.cpu(), para.cpu(), para_lengths.tolist()
    out = []
    for i, wav in enumerate(wavs):
        frames = num_encoder_frames_from_mel(host_mel[i])
        p = para[:, i, : para_lengths[i]] if para.dim() == 4 else para[i, : para_lengths[i]]
        out.append({"content": content[i, :frames].contiguous(), "paralinguistic": p.contiguous(),
                    "num_samples": torch.tensor(int(wav.shape[0]))})
    return out


def encode_clip(model, processor, wav) -> dict[str, torch.Tensor]:
    """One clip's tower outputs, computed alone: content (T, Dc), paralinguistic ((layers, L, Dp) or (L, Dp))."""
    return encode_clips(model, processor, [wav])[0]


def encode_in_batches(model, processor, load, items: Sequence, batch_size: int | None = None,
                      max_samples: int = ENCODE_BATCH_SAMPLES, workers: int = 4):
    """Yield (item, states) for every item, ``load(item)`` giving its waveform: clips decoded by a thread pool, sorted
    by length so that a batch carries little padding, encoded ``batch_size`` at a time (and at most ``max_samples``
    padded samples per call; ``batch_size`` defaults to :func:`encode_batch_size`). Items come back in length
    order, not input order."""
    from concurrent.futures import ThreadPoolExecutor

    batch_size = batch_size or encode_batch_size(model)

    def flush(batch):
        states = encode_clips(model, processor, [wav for _, wav in batch])
        return [(item, s) for (item, _), s in zip(batch, states)]

    chunk = max(batch_size * 8, 1)  # decode ahead this many clips, sort them, encode them in batches
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), chunk):
            loaded = sorted(zip(items[start : start + chunk], pool.map(load, items[start : start + chunk])),
                            key=lambda pair: pair[1].shape[0])
            batch: list = []
            for pair in loaded:
                longest = pair[1].shape[0]  # sorted by length: the newest clip is the batch's longest
                if batch and (len(batch) >= batch_size or longest * (len(batch) + 1) > max_samples):
                    yield from flush(batch)
                    batch = []
                batch.append(pair)
            if batch:
                yield from flush(batch)


def cache_features(model, processor, records: Iterable[EmotionRecord], data_root: str | os.PathLike,
                   cache_dir: str | os.PathLike, shard_size: int = 256, dtype: torch.dtype | None = None,
                   batch_size: int | None = None) -> Path:
    """Encode every clip not yet cached into ``cache_dir/<fingerprint>``, ``batch_size`` clips per tower call
    (default: :func:`encode_batch_size`); returns that folder. Resumable."""
    from tqdm.auto import tqdm

    fingerprint = encoder_fingerprint(model, processor)
    folder = Path(cache_dir) / fingerprint
    folder.mkdir(parents=True, exist_ok=True)
    inner = audio_encoder_of(model)
    (folder / "fingerprint.json").write_text(json.dumps({
        "fingerprint": fingerprint, "version": CACHE_FORMAT_VERSION,
        "content_encoder": inner.config.content_config._name_or_path or inner.config.content_config.model_type,
        "paralinguistic_encoder": inner.config.paralinguistic_config._name_or_path
        or inner.config.paralinguistic_config.model_type,
        "weighted_layers": bool(inner.config.paralinguistic_weighted_layers),
    }, indent=2))
    index_file = folder / INDEX_FILE
    index: dict[str, str] = json.loads(index_file.read_text()) if index_file.is_file() else {}
    seen, todo = set(index), []
    for record in records:
        if record.id not in seen:
            seen.add(record.id)
            todo.append(record)
    model.eval()
    next_shard = len({*index.values()})
    pending: dict[str, torch.Tensor] = {}
    pending_ids: list[str] = []

    def flush():
        nonlocal next_shard, pending, pending_ids
        if not pending_ids:
            return
        name = f"shard-{next_shard:05d}.safetensors"
        while (folder / name).exists():  # a shard from an interrupted run that never reached the index
            next_shard += 1
            name = f"shard-{next_shard:05d}.safetensors"
        tmp = folder / (name + ".tmp")
        save_file(pending, str(tmp), metadata={"fingerprint": fingerprint})
        os.replace(tmp, folder / name)
        index.update(dict.fromkeys(pending_ids, name))
        tmp_index = index_file.with_name(INDEX_FILE + ".tmp")
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, index_file)
        next_shard += 1
        pending, pending_ids = {}, []

    def load(record):
        return processor.load(str(resolve_under_root(record.audio, data_root, record=record.id)))

    progress = tqdm(total=len(todo), desc="cache-features", unit="clip", disable=not todo)
    for record, states in encode_in_batches(model, processor, load, todo, batch_size=batch_size):
        progress.update(1)
        for key, tensor in states.items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            pending[f"{record.id}/{key}"] = tensor
        pending_ids.append(record.id)
        if len(pending_ids) >= shard_size:
            flush()
    flush()
    progress.close()
    logger.info("feature cache %s: %d clips (%d new)", folder, len(index), len(todo))
    return folder
