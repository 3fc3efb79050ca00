"""Prosody warm-up of the tiny model's paralinguistic tower: the stand-in for WavLM/HuBERT pre-training.

Why it exists. Real recipes put a pretrained WavLM or HuBERT in the paralinguistic slot. Frozen features of those
models carry pitch, loudness and voicing well enough for SUPERB's emotion-recognition task (Yang et al., 2021,
"SUPERB"; Chen et al., 2022, "WavLM"). The tiny model that the tests and the demo build (emoreason.testing.tiny) has a
*random* WavLM, and a random tower barely carries prosody. Measured on the synthetic corpus's held-out voices x held-out
sentences (48 clips, 4 emotions), a logistic-regression probe on its time-pooled states scores 0.69, and the SFT
learning test stays below 0.8 whatever the training recipe (0.77-0.79); with this warm-up it scores 0.83-0.875
(tests/test_sft_learning.py). Without it, a learning test of the tiny model mostly measures how little prosody a
random network keeps, not whether the training code teaches the LLM to use the voice.

What it does. A few epochs of regression from the tower's last layer, through the model's own `encode_paralinguistic`:
- per frame: log F0 on voiced frames, voicing and energy (emoreason.datagen.acoustic.track_pitch, YIN);
- at every frame, the clip's standardised pitch level, pitch range, voiced share, loudness, speaking rate and pause
  share (emoreason.datagen.acoustic.analyze: the measures the data generator describes clips with).

It reads the *training split's* clips only, and never their emotion labels; validation and test clips are never
opened. The projector, LLM and content tower are untouched. It must run before SFT measures the projector's feature
normalisation, so a model whose normalisation is already fitted is refused.

`emoreason warmup-tower --model runs/tiny-model --manifest runs/synth-corpus/records.jsonl --out runs/tiny-prosody`
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data.audio import TARGET_SAMPLE_RATE, load_audio
from ..data.schema import read_records
from ..datagen.acoustic import HOP_SECONDS, PitchTrack, analyze, track_pitch

REFERENCE_F0_HZ = 150.0  # log2(F0 / 150 Hz): 0 in the middle of the speaking range, about +-1 at its ends
ENERGY_CENTER_DB, ENERGY_SCALE_DB = -40.0, 20.0
TARGETS = ("log_f0", "voicing", "energy")
# Clip-level measures (emoreason.datagen.acoustic.analyze, the data generator's own description of a clip), asked of
# every frame: the tower then carries the utterance's pitch level, range, loudness and tempo in each of its states.
CLIP_TARGETS = ("pitch_level", "pitch_range", "voiced_ratio", "energy", "rate", "pause_ratio")
SUMMARY_FILE = "prosody_warmup.json"


def prosody_targets(waveform: np.ndarray, frame_seconds: float,
                    track: PitchTrack | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-level targets at the tower's frame rate: (frames, 3) [log2(F0/150 Hz) (0 where unvoiced), voicing 0/1,
    energy (dBFS + 40) / 20 clipped to +-3] and the voiced mask (frames,). ``track``: the clip's pitch track, if the
    caller has it already."""
    track = track if track is not None else track_pitch(waveform)
    step = max(1, int(round(frame_seconds / HOP_SECONDS)))
    voiced = track.voiced[::step]
    f0 = np.where(voiced, np.log2(np.nan_to_num(track.f0_hz[::step], nan=REFERENCE_F0_HZ) / REFERENCE_F0_HZ), 0.0)
    energy = np.clip((track.energy_db[::step] - ENERGY_CENTER_DB) / ENERGY_SCALE_DB, -3.0, 3.0)
    targets = np.stack([f0, voiced.astype(np.float32), energy], axis=1).astype(np.float32)
    return torch.from_numpy(targets), torch.from_numpy(voiced.copy())


def clip_targets(waveform: np.ndarray, transcript: str | None = None,
                 track: PitchTrack | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The clip-level measures of ``CLIP_TARGETS`` (raw: log2 pitch / 150 Hz, range in octaves, voiced share, dBFS / 20,
    log2 syllables per second, pause share) and which of them exist (no pitch on an unvoiced clip)."""
    f = analyze(waveform, transcript=transcript, track=track)
    values = [math.log2(f.pitch_hz / REFERENCE_F0_HZ) if f.pitch_hz else 0.0,
              (f.pitch_range_st or 0.0) / 12.0, f.voiced_ratio, f.energy_dbfs / ENERGY_SCALE_DB,
              math.log2(max(f.rate_sps, 0.1)), f.pause_ratio]
    present = [f.pitch_hz is not None, f.pitch_range_st is not None, True, True, True, True]
    return np.asarray(values, np.float32), np.asarray(present, bool)


def _tower_frame_seconds(model) -> float:
    config = model.config.paralinguistic_config
    return int(np.prod(config.conv_stride)) / TARGET_SAMPLE_RATE


def warm_up_paralinguistic_tower(model, processor, records: Sequence, data_root: str | Path, epochs: int = 8,
                                 learning_rate: float = 1e-3, clips_per_step: int = 8, seed: int = 0,
                                 progress: bool = True) -> dict[str, Any]:
    """Train ``model``'s paralinguistic tower in place on the prosody of the ``split == "train"`` records (see the
    module docstring), the learning rate decaying to a tenth on a cosine. Returns a summary: clips, epochs, steps, the
    mean loss of every epoch, seconds.

    Runs where the tower is: the regression head, the targets and every batch are put on the tower's device (the head
    is initialised on the CPU first and then moved, so a seed gives the same head everywhere, and on the CPU the same
    numbers as before the placement was added)."""
    if epochs < 1 or clips_per_step < 1 or learning_rate <= 0:
        raise ValueError("warm_up_paralinguistic_tower: epochs and clips_per_step must be >= 1, learning_rate > 0")
    audio_encoder = model.get_audio_encoder()
    projector = audio_encoder.projector
    if getattr(projector, "feature_norm_fitted", False):
        raise ValueError("the projector's feature normalisation is already fitted on this tower's states; warm up the "
                         "tower of an untrained base model (before SFT)")
    train = [r for r in records if r.split == "train"]
    if not train:
        raise ValueError("no training-split clips to warm the tower up on")
    frame_seconds = _tower_frame_seconds(model)
    tower = audio_encoder.paralinguistic_encoder
    device = next(tower.parameters()).device
    clips, measures, present = [], [], []
    for record in train:
        waveform = load_audio(record.audio_path(data_root))
        track = track_pitch(waveform)
        targets, voiced = prosody_targets(waveform, frame_seconds, track)
        values, exists = clip_targets(waveform, record.transcript, track)
        clips.append((waveform, targets.to(device), voiced.to(device)))
        measures.append(values)
        present.append(exists)
    # clip measures standardised over the training clips (where they exist)
    measures, present = np.stack(measures), np.stack(present)
    masked = np.where(present, measures, np.nan)
    mean, std = np.nanmean(masked, 0), np.nanstd(masked, 0)
    mean, std = np.nan_to_num(mean), np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
    clip_z = torch.from_numpy(((np.nan_to_num(masked) - mean) / std).astype(np.float32)).to(device)
    clip_mask = torch.from_numpy(present).to(device)

    torch.manual_seed(seed)
    head = nn.Linear(tower.config.hidden_size, len(TARGETS) + len(CLIP_TARGETS)).to(device)
    generator = torch.Generator().manual_seed(seed)
    params = list(tower.parameters()) + list(head.parameters())
    was_training, flags = tower.training, [p.requires_grad for p in tower.parameters()]
    for p in tower.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    tower.train()

    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(len(clips) / clips_per_step)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    bar = tqdm(total=total_steps, desc="tower prosody warm-up", unit="step", disable=not progress,
               dynamic_ncols=True)
    epoch_losses: list[float] = []
    start = time.time()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(clips), generator=generator).tolist()
            total = 0.0
            for first in range(0, len(order), clips_per_step):
                index = order[first : first + clips_per_step]
                batch = [clips[i] for i in index]
                feats = processor.audio_features([b[0] for b in batch])
                states, lengths = audio_encoder.encode_paralinguistic(feats["input_values"].to(device),
                                                                      feats["input_values_mask"].to(device))
                if states.dim() == 4:  # layer-weighted towers return every layer: train the last
                    states = states[-1]
                loss = _prosody_loss(head(states.float()), lengths, [b[1] for b in batch], [b[2] for b in batch],
                                     clip_z[index], clip_mask[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            epoch_losses.append(total / steps_per_epoch)
    finally:
        bar.close()
        for p, flag in zip(tower.parameters(), flags):
            p.requires_grad_(flag)
        tower.train(was_training)
    if not all(math.isfinite(x) for x in epoch_losses):
        raise FloatingPointError(f"the tower warm-up diverged (epoch losses {epoch_losses})")
    return {"clips": len(clips), "epochs": epochs, "steps": total_steps, "first_epoch_loss":
            round(epoch_losses[0], 4), "last_epoch_loss": round(epoch_losses[-1], 4),
            "epoch_losses": [round(x, 4) for x in epoch_losses], "seconds": round(time.time() - start, 1),
            "targets": list(TARGETS), "clip_targets": list(CLIP_TARGETS)}


def _prosody_loss(predicted: torch.Tensor, lengths: torch.Tensor, targets: list[torch.Tensor],
                  voiced: list[torch.Tensor], clip_z: torch.Tensor, clip_mask: torch.Tensor) -> torch.Tensor:
    """Mean over clips of: squared log-F0 error on voiced frames + voicing cross-entropy + squared energy error +
    the mean squared error of the standardised clip measures, predicted at every frame."""
    losses = []
    for i, (target, mask) in enumerate(zip(targets, voiced)):
        n = min(int(lengths[i]), target.shape[0])
        if n == 0:
            continue
        p, t, v = predicted[i, :n], target[:n], mask[:n].float()
        f0 = ((p[:, 0] - t[:, 0]) ** 2 * v).sum() / v.sum().clamp(min=1.0)
        voicing = nn.functional.binary_cross_entropy_with_logits(p[:, 1], t[:, 1])
        energy = ((p[:, 2] - t[:, 2]) ** 2).mean()
        k = len(TARGETS)
        m = clip_mask[i].float()
        clip = (((p[:, k:] - clip_z[i]) ** 2).mean(0) * m).sum() / m.sum().clamp(min=1.0)
        losses.append(f0 + voicing + energy + clip)
    if not losses:
        raise ValueError("no tower frames to train on (clips shorter than one frame)")
    return torch.stack(losses).mean()


def warm_up_model(model_dir: str | Path, manifest: str | Path, out_dir: str | Path, data_root: str | Path | None = None,
                  epochs: int = 8, seed: int = 0, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Load ``model_dir``, warm its paralinguistic tower up on ``manifest``'s training clips (on ``device``; default
    the CPU), save model, processor and ``prosody_warmup.json`` (the summary) to ``out_dir``."""
    from ..modeling import load_pretrained

    manifest = Path(manifest)
    data_root = Path(data_root) if data_root is not None else manifest.parent
    records = read_records(manifest)
    model, processor = load_pretrained(model_dir)
    if device is not None:
        model.to(device)
    summary = warm_up_paralinguistic_tower(model, processor, records, data_root, epochs=epochs, seed=seed,
                                           progress=progress)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {**summary, "base_model": str(Path(model_dir).resolve()), "manifest": str(manifest.resolve())}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emoreason warmup-tower", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model folder (e.g. from `emoreason make-tiny`)")
    parser.add_argument("--manifest", required=True, help="records.jsonl; only its train split is read")
    parser.add_argument("--data-root", help="audio root (default: the manifest's folder)")
    parser.add_argument("--out", required=True, help="folder for the warmed-up model")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="where to train the tower, e.g. cuda (default: the CPU)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = warm_up_model(args.model, args.manifest, args.out, data_root=args.data_root, epochs=args.epochs,
                            seed=args.seed, progress=not args.no_progress, device=args.device)
    print(json.dumps(summary))
    return 0
