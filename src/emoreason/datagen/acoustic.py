"""Acoustic analysis: pitch, energy, speaking rate, pauses and intonation, then words calibrated per corpus.

Speed matters (a corpus is hundreds of hours), so pitch is a vectorised YIN (de Cheveigné & Kawahara, 2002) in numpy:
all frames' difference functions come from one batched FFT at 8 kHz, which is enough bandwidth for F0 up to 500 Hz.
``benchmarks/acoustic.py`` measures it against a ``librosa.pyin`` analysis (speed and voiced-frame median F0).

Values become words by tertiles (low / normal / high) fitted on the training split, per corpus, and per corpus and
gender for pitch (speaker sex dominates absolute F0). The fitted :class:`Calibration` is saved with a run so that
validation and test records are described with the training calibration.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import fft as scipy_fft

from ..data.audio import MIN_SPEECH_SECONDS, SILENCE_FLOOR_DBFS
from ..data.cues import CUES

ANALYSIS_RATE = 8_000  # Hz; pitch, energy and activity are all measured at this rate
HOP_SECONDS = 0.01
WINDOW_SECONDS = 0.032  # YIN integration window: two periods of a 60 Hz voice

INTONATIONS = CUES["intonation"].levels

# cue name in records -> (measured value key, level words low..high); the words are emoreason.data.cues' own
LEVEL_WORDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pitch_level": ("pitch_hz", CUES["pitch_level"].levels),
    "energy_level": ("energy_dbfs", CUES["energy_level"].levels),
    "rate_level": ("rate_sps", CUES["rate_level"].levels),
    "pitch_variation": ("pitch_range_st", CUES["pitch_variation"].levels),
}

# Used only when a corpus (or a corpus+gender group) has too few training clips to fit tertiles.
DEFAULT_EDGES: dict[str, tuple[float, float]] = {
    "pitch_hz": (140.0, 200.0),
    "pitch_hz/female": (185.0, 235.0),
    "pitch_hz/male": (105.0, 140.0),
    "energy_dbfs": (-30.0, -20.0),
    "rate_sps": (3.5, 5.0),
    "pitch_range_st": (3.0, 6.0),
}
MIN_CLIPS_FOR_TERTILES = 6

# A clip "has speech" when its loudest 10 ms frame reaches SILENCE_FLOOR_DBFS and YIN finds at least
# MIN_VOICED_SECONDS of voiced frames. Measured: every espeak clip of the synthetic corpus has >= 0.45 s voiced and a
# peak above -23 dBFS; digital silence, dither, white noise (-60 and -30 dBFS) and a -63 dBFS mains hum have 0 s.
MIN_VOICED_SECONDS = MIN_SPEECH_SECONDS


@dataclass
class PitchTrack:
    f0_hz: np.ndarray  # per frame, NaN where unvoiced
    voiced: np.ndarray  # bool per frame
    energy_db: np.ndarray  # per-frame power in dBFS
    hop_seconds: float = HOP_SECONDS


@dataclass
class AcousticFeatures:
    duration: float
    pitch_hz: float | None  # voiced-frame median F0
    pitch_mean_hz: float | None
    pitch_range_st: float | None  # 10th..90th percentile of voiced F0, in semitones
    voiced_ratio: float
    energy_dbfs: float  # mean power over voiced (else active) frames
    rate_sps: float  # syllables per second of speaking time (articulation rate)
    pause_ratio: float  # share of the speaking span spent in pauses >= 150 ms
    intonation: str
    peak_dbfs: float | None = None  # loudest 10 ms frame

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@functools.lru_cache(maxsize=16)
def _antialias_filter(up: int, down: int) -> np.ndarray:
    # The filter resample_poly would design on every call (its default Kaiser window), designed once per ratio.
    from scipy.signal import firwin

    half_len = 10 * max(up, down)
    return firwin(2 * half_len + 1, 1.0 / max(up, down), window=("kaiser", 5.0))


def _downsample(waveform: np.ndarray, sampling_rate: int) -> np.ndarray:
    if sampling_rate == ANALYSIS_RATE:
        return waveform.astype(np.float32, copy=False)
    from fractions import Fraction

    from scipy.signal import resample_poly

    ratio = Fraction(ANALYSIS_RATE, int(sampling_rate)).limit_denominator(1000)
    up, down = ratio.numerator, ratio.denominator
    return resample_poly(waveform.astype(np.float32, copy=False), up, down, window=_antialias_filter(up, down))


def track_pitch(
    waveform: np.ndarray,
    sampling_rate: int = 16_000,
    fmin: float = 60.0,
    fmax: float = 500.0,
    threshold: float = 0.35,
    silence_db: float = 55.0,
) -> PitchTrack:
    """Vectorised YIN with a voicing decision (a periodicity dip below ``threshold`` in a frame that is not silent).

    ``silence_db``: frames more than this many dB below the loudest frame count as silence.
    """
    x = _downsample(np.asarray(waveform), sampling_rate)
    sr = ANALYSIS_RATE
    hop = int(round(HOP_SECONDS * sr))
    window = int(round(WINDOW_SECONDS * sr))
    tau_min = max(2, int(math.floor(sr / fmax)))
    tau_max = int(math.ceil(sr / fmin))
    # Frames are nfft long: the head (first `window` samples, zero-padded) against the whole frame gives every lag
    # up to tau_max without circular wrap-around, in one batched FFT cross-correlation.
    nfft = 1 << int(math.ceil(math.log2(window + tau_max + 1)))
    n_frames = max(1, 1 + (len(x) - window) // hop)
    padded = np.zeros((n_frames - 1) * hop + nfft, dtype=np.float32)
    padded[: min(len(x), len(padded))] = x[: len(padded)]
    frames = np.lib.stride_tricks.sliding_window_view(padded, nfft)[::hop][:n_frames]
    spectrum = scipy_fft.rfft(frames, axis=1)
    spectrum *= np.conj(scipy_fft.rfft(frames[:, :window], nfft, axis=1))
    corr = scipy_fft.irfft(spectrum, nfft, axis=1)[:, : tau_max + 1]
    # d(tau) = E(0) + E(tau) - 2 r(tau), with E(tau) the energy of the window starting at lag tau.
    cumsq = np.concatenate([[0.0], np.cumsum(padded.astype(np.float64) ** 2)])
    window_energy = (cumsq[window:] - cumsq[:-window]).astype(np.float32)
    energy_at = np.lib.stride_tricks.sliding_window_view(window_energy, tau_max + 1)[::hop][:n_frames]
    diff = np.maximum(energy_at[:, :1] + energy_at - 2.0 * corr, 0.0)
    taus = np.arange(tau_max + 1, dtype=np.float32)

    # Cumulative mean normalised difference d'(tau) = d(tau) * tau / sum_{1..tau} d.
    cmnd = np.ones_like(diff)
    running = np.cumsum(diff[:, 1:], axis=1)
    cmnd[:, 1:] = diff[:, 1:] * taus[1:] / np.maximum(running, 1e-12)

    search = cmnd[:, tau_min : tau_max + 1]
    inner = search[:, 1:-1]
    local_min = (inner < search[:, :-2]) & (inner <= search[:, 2:])
    candidates = local_min & (inner < threshold)
    has_dip = candidates.any(axis=1)
    first = np.argmax(candidates, axis=1) + 1  # index into `search`
    rows = np.arange(n_frames)
    # Parabolic interpolation around the chosen lag for sub-sample precision.
    left, mid = search[rows, first - 1], search[rows, first]
    right = search[rows, np.minimum(first + 1, search.shape[1] - 1)]
    denom = left - 2 * mid + right
    shift = np.where(np.abs(denom) > 1e-12, 0.5 * (left - right) / np.where(denom == 0, 1, denom), 0.0)
    lag = tau_min + first + np.clip(shift, -1, 1)

    power = energy_at[:, 0].astype(np.float64) / window
    energy_db = 10.0 * np.log10(np.maximum(power, 1e-12))
    loud = energy_db > max(energy_db.max() - silence_db, -70.0)
    voiced = has_dip & loud
    f0 = np.where(voiced, sr / lag, np.nan)
    return PitchTrack(f0_hz=f0, voiced=voiced, energy_db=energy_db)


_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


def count_syllables(text: str) -> int:
    """Vowel-group syllable estimate for English text (silent final e discounted); digits count as two."""
    total = 0
    for word in re.findall(r"[a-z']+|\d+", text.lower()):
        if word.isdigit():
            total += 2 * len(word)
            continue
        groups = len(_VOWEL_GROUPS.findall(word))
        if word.endswith("e") and not word.endswith(("le", "ee", "ye")) and groups > 1:
            groups -= 1
        total += max(1, groups)
    return total


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) index pairs of consecutive True runs."""
    if not mask.any():
        return []
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _count_nuclei(energy_db: np.ndarray, voiced: np.ndarray, prominence_db: float = 2.0) -> int:
    """Syllable nuclei: voiced peaks of the smoothed energy contour that stand out from the dip before them."""
    smooth = np.convolve(energy_db, np.ones(5) / 5, mode="same")
    count, last_dip = 0, smooth[0] if len(smooth) else 0.0
    for i in range(1, len(smooth) - 1):
        if smooth[i] < last_dip:
            last_dip = smooth[i]
        is_peak = smooth[i] >= smooth[i - 1] and smooth[i] > smooth[i + 1]
        if voiced[i] and is_peak and smooth[i] - last_dip >= prominence_db:
            count += 1
            last_dip = smooth[i]
    return count


def classify_intonation(f0_hz: np.ndarray, threshold_st: float = 1.5) -> str:
    """Contour class from the medians of the first, middle and last third of the voiced F0 (in semitones)."""
    voiced = f0_hz[np.isfinite(f0_hz)]
    if len(voiced) < 6:
        return "flat"
    semitones = 12.0 * np.log2(voiced / 100.0)
    first, middle, last = (float(np.median(part)) for part in np.array_split(semitones, 3))
    if middle - max(first, last) > threshold_st:
        return "rise-fall"
    if min(first, last) - middle > threshold_st:
        return "fall-rise"
    if last - first > threshold_st:
        return "rising"
    if first - last > threshold_st:
        return "falling"
    return "flat"


def analyze(
    waveform: np.ndarray,
    sampling_rate: int = 16_000,
    transcript: str | None = None,
    fmin: float = 60.0,
    fmax: float = 500.0,
    pause_min_seconds: float = 0.15,
    active_db: float = 35.0,
    track: PitchTrack | None = None,
) -> AcousticFeatures:
    """Measure one clip. With a transcript the speaking rate counts its syllables, else energy-peak nuclei.
    ``track``: the clip's pitch track when the caller already has it (``fmin``/``fmax`` are then not used)."""
    if track is None:
        track = track_pitch(waveform, sampling_rate, fmin=fmin, fmax=fmax)
    duration = len(waveform) / float(sampling_rate)
    f0 = track.f0_hz[track.voiced]
    if len(f0):
        pitch_hz = float(np.median(f0))
        pitch_mean = float(np.mean(f0))
        lo, hi = np.percentile(f0, [10, 90])
        pitch_range = float(12.0 * math.log2(hi / lo)) if lo > 0 else 0.0
    else:
        pitch_hz = pitch_mean = pitch_range = None

    energy_db = track.energy_db
    active = energy_db > max(energy_db.max() - active_db, -70.0)
    basis = track.voiced if track.voiced.any() else active if active.any() else np.ones_like(active)
    energy_dbfs = float(10.0 * np.log10(np.mean(10.0 ** (energy_db[basis] / 10.0)) + 1e-12))

    runs = _runs(active)
    pause_frames, speaking_frames = 0, int(active.sum())
    if runs:
        span_start, span_end = runs[0][0], runs[-1][1]
        min_pause = int(round(pause_min_seconds / track.hop_seconds))
        gaps = _runs(~active[span_start:span_end])
        pause_frames = sum(end - start for start, end in gaps if end - start >= min_pause)
        span_frames = span_end - span_start
        pause_ratio = pause_frames / span_frames if span_frames else 0.0
        speaking_frames = max(1, span_frames - pause_frames)
    else:
        pause_ratio = 0.0
    speaking_seconds = max(speaking_frames * track.hop_seconds, 1e-3)
    if transcript and transcript.strip():
        syllables = count_syllables(transcript)
    else:
        syllables = _count_nuclei(energy_db, track.voiced)
    return AcousticFeatures(
        duration=duration,
        pitch_hz=pitch_hz,
        pitch_mean_hz=pitch_mean,
        pitch_range_st=pitch_range,
        voiced_ratio=float(track.voiced.mean()) if len(track.voiced) else 0.0,
        energy_dbfs=energy_dbfs,
        rate_sps=float(syllables / speaking_seconds),
        pause_ratio=float(pause_ratio),
        intonation=classify_intonation(track.f0_hz),
        peak_dbfs=float(energy_db.max()) if len(energy_db) else None,
    )


def no_speech_reason(features: Mapping, min_voiced_seconds: float = MIN_VOICED_SECONDS,
                     silence_floor_dbfs: float = SILENCE_FLOOR_DBFS) -> str | None:
    """Why a measured clip holds no speech to describe (silence, near-silence, noise), or None when it does.

    Without voiced frames every measure is meaningless (the speaking rate of silence divides by ~0), so such clips
    must not be described, trained on, or counted in the calibration."""
    peak = features.get("peak_dbfs")
    if peak is not None and peak < silence_floor_dbfs:
        return (f"no speech: the loudest frame is {peak:.1f} dBFS, below the silence floor of "
                f"{silence_floor_dbfs:g} dBFS")
    voiced = float(features.get("voiced_ratio") or 0.0) * float(features.get("duration") or 0.0)
    if voiced < min_voiced_seconds:
        return (f"no speech: {voiced:.2f} s of voiced frames, fewer than the {min_voiced_seconds:g} s needed "
                "(silence or noise)")
    return None


# -- calibration: measured values -> words --------------------------------------------------------------------
@dataclass
class Calibration:
    """Tertile edges per group key: ``"<corpus>/<measure>"`` and ``"<corpus>/<gender>/pitch_hz"``."""

    edges: dict[str, tuple[float, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    split: str = "train"

    @classmethod
    def fit(cls, items: Iterable[tuple[str, str | None, Mapping]], split: str = "train") -> Calibration:
        """``items``: (corpus, gender, measured values) of the calibration split's clips."""
        groups: dict[str, list[float]] = defaultdict(list)
        for corpus, gender, values in items:
            for _, (measure, _) in LEVEL_WORDS.items():
                value = values.get(measure)
                if value is None or not math.isfinite(value):
                    continue
                groups[f"{corpus}/{measure}"].append(float(value))
                if measure == "pitch_hz" and gender:
                    groups[f"{corpus}/{gender}/{measure}"].append(float(value))
        edges, counts = {}, {}
        for key, values in groups.items():
            counts[key] = len(values)
            if len(values) >= MIN_CLIPS_FOR_TERTILES:
                low, high = np.quantile(np.asarray(values), [1 / 3, 2 / 3])
                edges[key] = (float(low), float(high))
        return cls(edges=edges, counts=counts, split=split)

    def edges_for(self, corpus: str, measure: str, gender: str | None = None) -> tuple[tuple[float, float], str]:
        """The most specific fitted edges, and where they came from (for the record's provenance)."""
        keys = ([f"{corpus}/{gender}/{measure}"] if gender and measure == "pitch_hz" else []) + [f"{corpus}/{measure}"]
        for key in keys:
            if key in self.edges:
                return self.edges[key], key
        default_key = f"{measure}/{gender}" if gender and f"{measure}/{gender}" in DEFAULT_EDGES else measure
        return DEFAULT_EDGES[default_key], f"default:{default_key}"

    def describe(self, features: Mapping, corpus: str, gender: str | None = None) -> dict:
        """Measured values and their words, the ``cues`` of a record."""
        cues: dict = {
            "pitch_hz": features.get("pitch_hz"),
            "pitch_range_st": features.get("pitch_range_st"),
            "energy_dbfs": features.get("energy_dbfs"),
            "rate_sps": features.get("rate_sps"),
            "pause_ratio": features.get("pause_ratio"),
            "voiced_ratio": features.get("voiced_ratio"),
            "intonation": features.get("intonation"),
        }
        sources = {}
        for cue, (measure, words) in LEVEL_WORDS.items():
            value = features.get(measure)
            if value is None:
                cues[cue] = None
                continue
            (low, high), source = self.edges_for(corpus, measure, gender)
            cues[cue] = words[0] if value < low else words[2] if value > high else words[1]
            sources[cue] = source
        fluent, some, long = CUES["pauses"].levels
        pause_ratio = features.get("pause_ratio") or 0.0
        cues["pauses"] = long if pause_ratio > 0.2 else some if pause_ratio > 0.05 else fluent
        cues["calibration"] = sources
        return cues

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        data = {"split": self.split, "edges": {k: list(v) for k, v in sorted(self.edges.items())},
                "counts": dict(sorted(self.counts.items())), "defaults": {k: list(v) for k, v in DEFAULT_EDGES.items()}}
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        data = json.loads(Path(path).read_text())
        return cls(edges={k: tuple(v) for k, v in data["edges"].items()}, counts=data.get("counts", {}),
                   split=data.get("split", "train"))
