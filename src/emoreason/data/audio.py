"""Audio I/O: soundfile to decode, polyphase resampling to 16 kHz, one clear error type for every bad file.

``datasets``' Audio feature needs torchcodec (CUDA-linked on the registry), so audio stays as paths in records and is
decoded here. Callers catch :class:`AudioError`, record the reason and carry on.

A WAV file cut off in transfer still opens in libsndfile, which quietly returns the frames that are there; its header
still declares the full length, so :func:`check_wav_complete` compares the two and such a file is refused as truncated.

:func:`silent_or_too_short` is the one rule for a clip that decodes but cannot hold speech (shorter than
:data:`MIN_SPEECH_SECONDS`, or its loudest 10 ms frame below :data:`SILENCE_FLOOR_DBFS`): datagen refuses to describe
such a clip and the built-in server refuses to answer about it (400), by the same code.
"""

from __future__ import annotations

import io
import os
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np

TARGET_SAMPLE_RATE = 16_000
# A clip holds speech only if it lasts MIN_SPEECH_SECONDS (datagen's analysis needs 0.1 s of voiced frames) and its
# loudest 10 ms frame reaches SILENCE_FLOOR_DBFS (measured: the synthetic corpus's quietest clip peaks above -23 dBFS;
# digital silence and dither sit far below -60).
MIN_SPEECH_SECONDS = 0.1
SILENCE_FLOOR_DBFS = -60.0
FRAME_SECONDS = 0.01


class AudioError(ValueError):
    """An audio file or buffer that cannot be used: unreadable, empty, silent-by-corruption, NaN-filled..."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"bad audio {source}: {reason}")


EMPTY_FILE = "empty file (0 bytes)"
_UNKNOWN_DATA_SIZES = (0, 0xFFFFFFFF)  # streaming writers that could not seek back to fill in the size


def _wav_shortfall(handle, total_size: int) -> tuple[int, int, int] | None:
    """(declared frames, present frames, sample rate) when a RIFF/WAVE header declares more audio than the file
    holds; None when complete or not a plain WAV (RF64, unknown size: nothing to compare)."""
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    offset, block_align, rate = 12, 0, 0
    while offset + 8 <= total_size:
        handle.seek(offset)
        chunk_id, size = struct.unpack("<4sI", handle.read(8))
        if chunk_id == b"fmt ":
            fmt = handle.read(16)
            if len(fmt) == 16:
                _, _, rate, _, block_align = struct.unpack("<HHIIH", fmt[:14])
        elif chunk_id == b"data":
            present = total_size - offset - 8
            if size in _UNKNOWN_DATA_SIZES or size <= present or block_align <= 0:
                return None
            return size // block_align, present // block_align, rate
        offset += 8 + size + (size & 1)
    return None


def check_wav_complete(source: str | os.PathLike | bytes) -> None:
    """Raise :class:`AudioError` ("truncated") for a WAV whose data chunk is shorter than its header says."""
    if isinstance(source, (bytes, bytearray)):
        found = _wav_shortfall(io.BytesIO(source), len(source))
        name = "<bytes>"
    else:
        name = str(source)
        with open(source, "rb") as handle:
            found = _wav_shortfall(handle, os.fstat(handle.fileno()).st_size)
    if found is not None:
        declared, present, rate = found
        seconds = (f" ({declared / rate:.2f} s declared, {present / rate:.2f} s present)" if rate else "")
        raise AudioError(name, f"truncated file: the header declares {declared} frames but only {present} are "
                               f"present{seconds}")


def load_audio(source: str | os.PathLike | bytes, sampling_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Decode a file path or encoded bytes (wav/flac/ogg/mp3) to mono float32 at ``sampling_rate``."""
    import soundfile as sf

    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise AudioError(name, "empty (0 bytes)")
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(name, "file not found")
        if path.stat().st_size == 0:
            raise AudioError(name, EMPTY_FILE)
    check_wav_complete(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError... for bad input
        raise AudioError(name, f"unreadable ({type(err).__name__}: {err})") from None
    return prepare_waveform(data, rate, sampling_rate, source=name)


def prepare_waveform(
    waveform: np.ndarray, rate: int, sampling_rate: int = TARGET_SAMPLE_RATE, source: str = "<array>"
) -> np.ndarray:
    """Validate an in-memory waveform (samples, or samples x channels), down-mix to mono, resample."""
    data = np.asarray(waveform)
    if data.dtype.kind not in "fiu":
        raise AudioError(source, f"unsupported sample type {data.dtype}")
    if data.dtype.kind in "iu":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    data = data.astype(np.float32, copy=False)
    if data.size == 0:
        raise AudioError(source, "zero-length audio")
    if data.ndim == 2:
        # soundfile gives (samples, channels); accept (channels, samples) when channels is clearly the short axis.
        if data.shape[0] < data.shape[1] and data.shape[0] <= 8:
            data = data.T
        data = data.mean(axis=1)
    elif data.ndim != 1:
        raise AudioError(source, f"expected 1-D or 2-D audio, got shape {tuple(data.shape)}")
    if data.size == 0:
        raise AudioError(source, "zero-length audio")
    if not np.isfinite(data).all():
        raise AudioError(source, "contains NaN or infinite samples")
    if rate <= 0:
        raise AudioError(source, f"invalid sample rate {rate}")
    if rate != sampling_rate:
        from scipy.signal import resample_poly

        ratio = Fraction(sampling_rate, int(rate)).limit_denominator(1000)
        data = resample_poly(data, ratio.numerator, ratio.denominator).astype(np.float32)
    if data.size == 0:
        raise AudioError(source, "zero-length audio after resampling")
    return data


def silent_or_too_short(waveform: np.ndarray, sampling_rate: int = TARGET_SAMPLE_RATE,
                        min_seconds: float = MIN_SPEECH_SECONDS,
                        silence_floor_dbfs: float = SILENCE_FLOOR_DBFS) -> str | None:
    """Why a decoded mono clip cannot hold speech, or None when it can: shorter than ``min_seconds``, or its loudest
    10 ms frame (mean power, dBFS) below ``silence_floor_dbfs``."""
    data = np.asarray(waveform, dtype=np.float64).ravel()
    seconds = data.size / sampling_rate
    if seconds < min_seconds:
        return (f"too short: the clip is {seconds:.3f} s ({data.size} samples), shorter than the {min_seconds:g} s "
                "speech needs")
    frame = max(1, int(round(FRAME_SECONDS * sampling_rate)))
    usable = data[: data.size - data.size % frame].reshape(-1, frame) if data.size >= frame else data[None, :]
    peak = float(10.0 * np.log10(max(float((usable ** 2).mean(axis=1).max()), 1e-12)))
    if peak < silence_floor_dbfs:
        return (f"no speech: the loudest 10 ms frame is {peak:.1f} dBFS, below the silence floor of "
                f"{silence_floor_dbfs:g} dBFS")
    return None


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sampling_rate: int = TARGET_SAMPLE_RATE) -> Path:
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.asarray(waveform, dtype=np.float32), sampling_rate, subtype="PCM_16")
    return path


def encode_wav(waveform: np.ndarray, sampling_rate: int = TARGET_SAMPLE_RATE) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(waveform, dtype=np.float32), sampling_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def duration_of(path: str | os.PathLike) -> float:
    """Duration in seconds from the header (no decode)."""
    import soundfile as sf

    if not Path(path).is_file():
        raise AudioError(str(path), "file not found")
    if Path(path).stat().st_size == 0:
        raise AudioError(str(path), EMPTY_FILE)
    try:
        info = sf.info(str(path))
    except Exception as err:
        raise AudioError(str(path), f"unreadable ({type(err).__name__}: {err})") from None
    if info.frames == 0:
        raise AudioError(str(path), "zero-length audio")
    return info.frames / info.samplerate
