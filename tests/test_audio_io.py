"""Every kind of bad audio gives one clear error type; good audio of any rate/channels comes out mono 16 kHz."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from emoreason.data.audio import AudioError, encode_wav, load_audio


def write(path, data, rate=16_000, subtype="PCM_16"):
    sf.write(path, data, rate, subtype=subtype)
    return path


def test_good_audio_is_mono_16k(tmp_path):
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, (22_050, 2)).astype(np.float32)
    wav = load_audio(write(tmp_path / "s.wav", stereo, 22_050))
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.shape[0] == 16_000
    assert load_audio(encode_wav(wav)).shape == wav.shape


@pytest.mark.parametrize("kind", ["missing", "empty_file", "garbage", "zero_length", "nan", "directory", "truncated"])
def test_bad_audio_raises_audio_error(tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"RIFF\x00\x00not really a wave file at all" * 10)
    elif kind == "zero_length":
        write(path, np.zeros(0, dtype=np.float32))
    elif kind == "nan":
        write(path, np.full(1600, np.nan, dtype=np.float32), subtype="FLOAT")
    elif kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        write(tmp_path / "full.wav", np.zeros(16_000, dtype=np.float32))
        path.write_bytes((tmp_path / "full.wav").read_bytes()[:30])
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert err.value.reason and str(path.name) in str(err.value)
