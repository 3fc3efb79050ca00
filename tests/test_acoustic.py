"""Acoustic analysis: ranks espeak-ng renderings correctly, classifies contours, calibrates words by tertiles."""

from __future__ import annotations

import numpy as np
import pytest

from emoreason.data.audio import load_audio
from emoreason.datagen.acoustic import (
    Calibration,
    analyze,
    classify_intonation,
    count_syllables,
    no_speech_reason,
    track_pitch,
)
from emoreason.testing.synth_corpus import espeak_available, render

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")
TEXT = "We need to talk about the schedule."


@pytest.fixture(scope="module")
def renderings(tmp_path_factory):
    root = tmp_path_factory.mktemp("renderings")
    base = {"pitch": 50, "rate": 160, "amplitude": 100}
    variants = {"low_pitch": {"pitch": 15}, "high_pitch": {"pitch": 85}, "soft": {"amplitude": 30},
                "loud": {"amplitude": 190}, "slow": {"rate": 110}, "fast": {"rate": 240}}
    clips = {}
    for name, change in variants.items():
        path = render(TEXT, root / f"{name}.wav", "en-us+m3", **{**base, **change})
        clips[name] = load_audio(path)
    return clips


def test_ranks_pitch_energy_and_rate(renderings):
    feats = {name: analyze(wave, 16_000, transcript=TEXT) for name, wave in renderings.items()}
    assert feats["high_pitch"].pitch_hz > 1.3 * feats["low_pitch"].pitch_hz
    assert feats["loud"].energy_dbfs > feats["soft"].energy_dbfs + 6
    assert feats["fast"].rate_sps > 1.4 * feats["slow"].rate_sps
    # Without a transcript the rate comes from energy-peak syllable nuclei and still ranks them.
    assert analyze(renderings["fast"], 16_000).rate_sps > analyze(renderings["slow"], 16_000).rate_sps
    for f in feats.values():
        assert 0.0 <= f.pause_ratio < 1.0 and 0.0 < f.voiced_ratio <= 1.0 and f.intonation in (
            "rising", "falling", "rise-fall", "fall-rise", "flat")


def test_pitch_is_accurate_on_a_known_tone():
    rate = 16_000
    t = np.arange(rate) / rate
    for f0 in (90.0, 150.0, 240.0, 400.0):
        wave = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t) for k in (1, 2, 3))
        track = track_pitch(wave, rate)
        assert track.voiced.mean() > 0.9
        assert abs(np.median(track.f0_hz[track.voiced]) - f0) / f0 < 0.01


def test_silence_and_noise_are_unvoiced():
    rate = 16_000
    silence = np.zeros(rate, dtype=np.float32)
    feats = analyze(silence, rate)
    assert feats.pitch_hz is None and feats.voiced_ratio == 0.0 and feats.intonation == "flat"
    noise = np.random.default_rng(0).normal(0, 0.1, rate).astype(np.float32)
    assert track_pitch(noise, rate).voiced.mean() < 0.1


def test_no_speech_is_told_apart_from_speech(renderings):
    rate, rng = 16_000, np.random.default_rng(1)
    cases = {
        "silence": np.zeros(2 * rate, dtype=np.float32),
        "dither": rng.normal(0, 1 / 32768, 2 * rate).astype(np.float32),
        "noise": rng.normal(0, 0.05, 2 * rate).astype(np.float32),
        "quiet_speech": renderings["slow"] * 10 ** (-60 / 20),  # speech 60 dB down: under the floor
    }
    for name, wave in cases.items():
        reason = no_speech_reason(analyze(wave, rate).to_dict())
        assert reason and reason.startswith("no speech"), name
    for name, wave in renderings.items():  # control: every rendering has speech, the soft one included
        assert no_speech_reason(analyze(wave, rate).to_dict()) is None, name
    # The silent clip's speaking rate is what the check protects the rationale from.
    assert analyze(cases["silence"], rate, transcript="We need to talk.").rate_sps > 100


def test_intonation_classes_from_contours():
    up = np.linspace(100, 180, 60)
    down = up[::-1]
    assert classify_intonation(up) == "rising"
    assert classify_intonation(down) == "falling"
    assert classify_intonation(np.concatenate([up, down])) == "rise-fall"
    assert classify_intonation(np.concatenate([down, up])) == "fall-rise"
    assert classify_intonation(np.full(60, 120.0)) == "flat"
    assert classify_intonation(np.array([np.nan] * 60)) == "flat"


def test_rising_chirp_is_heard_as_rising():
    rate = 16_000
    t = np.arange(rate) / rate
    f0 = 120 + 100 * t  # 120 -> 220 Hz
    wave = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / rate)
    assert analyze(wave, rate).intonation == "rising"


def test_syllable_count():
    assert count_syllables("The meeting starts at nine tomorrow morning.") == 11
    assert count_syllables("") == 0 and count_syllables("It's 11") == 5


def test_calibration_tertiles_per_corpus_and_gender(tmp_path):
    items = [("c", "female", {"pitch_hz": 180 + 10 * i, "energy_dbfs": -30 + i, "rate_sps": 3 + 0.2 * i,
                              "pitch_range_st": 2 + 0.5 * i}) for i in range(9)]
    items += [("c", "male", {"pitch_hz": 90 + 5 * i, "energy_dbfs": -30 + i, "rate_sps": 3 + 0.2 * i,
                             "pitch_range_st": 2 + 0.5 * i}) for i in range(9)]
    cal = Calibration.fit(items)
    # 150 Hz is low for a female voice of this corpus and high for a male one.
    assert cal.describe({"pitch_hz": 150.0}, "c", "female")["pitch_level"] == "low"
    assert cal.describe({"pitch_hz": 150.0}, "c", "male")["pitch_level"] == "high"
    cues = cal.describe({"pitch_hz": 220.0, "energy_dbfs": -29.5, "rate_sps": 4.8, "pitch_range_st": 4.0,
                         "pause_ratio": 0.3, "intonation": "rising"}, "c", "female")
    assert (cues["pitch_level"], cues["energy_level"], cues["rate_level"]) == ("normal", "soft", "fast")
    assert cues["pitch_variation"] == "normal" and cues["pauses"] == "long pauses" and cues["intonation"] == "rising"
    assert cues["calibration"]["pitch_level"] == "c/female/pitch_hz"
    # An unseen corpus falls back to documented defaults, and says so.
    fallback = cal.describe({"pitch_hz": 300.0}, "other", "female")["calibration"]["pitch_level"]
    assert fallback == "default:pitch_hz/female"
    loaded = Calibration.load(cal.save(tmp_path / "calibration.json"))
    assert loaded.edges == cal.edges


@pytest.mark.slow
def test_agrees_with_pyin_on_speech(renderings):
    librosa = pytest.importorskip("librosa")
    for name in ("low_pitch", "high_pitch", "loud", "slow"):
        wave = renderings[name]
        ours = analyze(wave, 16_000).pitch_hz
        f0, voiced, _ = librosa.pyin(wave, fmin=60, fmax=500, sr=16_000, frame_length=1024, hop_length=160)
        reference = float(np.median(f0[voiced]))
        assert abs(ours - reference) / reference < 0.05, (name, ours, reference)
