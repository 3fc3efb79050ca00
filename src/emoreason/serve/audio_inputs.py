"""Audio parts of OpenAI-style chat messages -> 16 kHz waveforms, with a clear reason for every refusal.

Accepted parts: ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}`` (wav / flac / mp3 /
ogg, sniffed by libsndfile whatever ``format`` says) and ``{"type": "audio_url", "audio_url": {"url": ...}}`` with a
``data:`` URL or a ``file://`` URL under the server's allowed audio root. The server never fetches ``http(s)`` URLs:
a client that has a URL downloads it and sends the bytes. The encoding side (file -> ``input_audio`` part) is
:func:`emoreason.data.conversation.input_audio_part`, beside the prompt builder, so clients need nothing from here.

A clip longer than the server's limit is refused with its length (from the header when the format has one, so a long
file is not decoded just to be refused), never cut to fit.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from ..data.audio import TARGET_SAMPLE_RATE, AudioError, load_audio
from ..data.conversation import input_audio_part as encode_audio_part  # noqa: F401  (clients' name; lives in data)

AUDIO_PART_TYPES = ("input_audio", "audio_url", "audio")


class AudioInputError(ValueError):
    """An audio part the server refuses; the message is what the client sees (HTTP 400)."""


def _b64decode(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise AudioInputError(f"{where}: not valid base64 ({err})") from None


def _too_long(seconds: float, max_seconds: float | None, where: str) -> None:
    if max_seconds is not None and seconds > max_seconds + 1e-6:
        raise AudioInputError(f"{where}: the clip is {seconds:.2f} s long; this server accepts clips of at most "
                              f"{max_seconds:g} s (--max-audio-seconds)")


def _header_seconds(source) -> float | None:
    """Duration from the container header, or None when the header does not say (mp3, streamed wav)."""
    import soundfile as sf

    try:
        info = sf.info(source)
    except Exception:  # unreadable: load_audio gives the reason
        return None
    return info.frames / info.samplerate if info.frames > 0 and info.samplerate > 0 else None


def _decode(source, where: str, max_seconds: float | None) -> np.ndarray:
    seconds = _header_seconds(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    if seconds is not None:
        _too_long(seconds, max_seconds, where)
    try:
        wav = load_audio(source)
    except AudioError as err:
        raise AudioInputError(f"{where}: {err.reason}") from None
    _too_long(len(wav) / TARGET_SAMPLE_RATE, max_seconds, where)
    return wav


def _decode_bytes(raw: bytes, where: str, max_seconds: float | None = None) -> np.ndarray:
    if not raw:
        raise AudioInputError(f"{where}: empty audio")
    return _decode(raw, where, max_seconds)


def _file_url_path(url: str, allowed_root: Path | None, where: str) -> Path:
    if allowed_root is None:
        raise AudioInputError(f"{where}: file:// URLs are disabled; start the server with --allowed-audio-root DIR")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise AudioInputError(f"{where}: file:// URLs must name a local path, got host {parsed.netloc!r}")
    path = Path(unquote(parsed.path)).resolve()
    root = allowed_root.resolve()
    if path != root and root not in path.parents:
        raise AudioInputError(f"{where}: {path} is outside the allowed audio root {root}")
    return path


def decode_audio_part(part: dict, allowed_root: str | os.PathLike | None = None, where: str = "audio",
                      max_seconds: float | None = None) -> np.ndarray:
    """One content part -> mono float32 at 16 kHz; raises :class:`AudioInputError` with the reason (a clip longer
    than ``max_seconds`` included)."""
    kind = part.get("type")
    if kind == "input_audio":
        payload = part.get("input_audio")
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), str):
            raise AudioInputError(f"{where}: input_audio needs {{'data': <base64>, 'format': ...}}")
        return _decode_bytes(_b64decode(payload["data"], where), where, max_seconds)
    if kind in ("audio_url", "audio"):
        payload = part.get(kind) if kind == "audio_url" else part.get("audio_url", part.get("audio"))
        url = payload.get("url") if isinstance(payload, dict) else payload
        if not isinstance(url, str) or not url:
            raise AudioInputError(f"{where}: audio_url needs {{'url': ...}}")
        if url.startswith("data:"):
            header, _, body = url.partition(",")
            if not header.endswith(";base64"):
                raise AudioInputError(f"{where}: data: URLs must be base64 encoded (data:audio/wav;base64,...)")
            return _decode_bytes(_b64decode(body, where), where, max_seconds)
        if url.startswith("file://"):
            path = _file_url_path(url, Path(allowed_root) if allowed_root is not None else None, where)
            return _decode(path, where, max_seconds)
        scheme = urlparse(url).scheme or "(none)"
        raise AudioInputError(f"{where}: URL scheme {scheme!r} is not supported; send data: or file:// URLs")
    raise AudioInputError(f"{where}: unsupported content part type {kind!r}")
