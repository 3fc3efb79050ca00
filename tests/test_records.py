"""Record schema: validation names record and field, JSONL/parquet round trip, paths stay under the data root."""

from __future__ import annotations

import json

import pytest

from emoreason.data import EmotionRecord, RecordError, UnsafePathError, Vote, read_records, write_records
from emoreason.data.labels import consensus_label, entropy, multi_label, normalize_emotion, vote_distribution


def full_record(**overrides) -> EmotionRecord:
    votes = [Vote("r1", "angry"), Vote("r2", "angry"), Vote("r3", "frustrated", secondary=["sad"], arousal=4.0)]
    base = dict(
        id="clip-1", audio="wav/a.wav", duration=2.5, corpus="iemocap", split="test", speaker="Ses01F",
        gender="female", transcript="I can't believe it.", label="angry", votes=votes,
        distribution=vote_distribution([v.emotion for v in votes]), valence=2.0, arousal=4.5, dominance=3.0,
        cues={"pitch_hz": 231.5, "pitch_level": "high"}, context=["A: hello", "B: hi"], task="emotion_reasoning",
        instruction="What emotion?", response="<think>x</think><answer>angry</answer>", meta={"session": 1},
    )
    base.update(overrides)
    return EmotionRecord(**base)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    records = [full_record(), full_record(id="clip-2", gender=None, label=None, votes=[], distribution={})]
    path = write_records(records, tmp_path / f"r{suffix}")
    assert read_records(path) == records


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"duration": -1}, "duration"),
        ({"duration": "long"}, "duration"),
        ({"split": "dev"}, "split"),
        ({"gender": "f"}, "gender"),
        ({"label": "joyful"}, "label"),
        ({"distribution": {"angry": 0.5, "sad": 0.2}}, "distribution"),
        ({"votes": [{"rater": "r1", "emotion": "elated"}]}, "votes[0].emotion"),
        ({"color": "red"}, "color"),
        ({"audio": None}, "audio"),
        ({"context": "not a list"}, "context"),
    ],
)
def test_validation_names_record_and_field(change, field):
    data = full_record().to_dict()
    data.update(change)
    with pytest.raises(RecordError) as err:
        EmotionRecord.from_dict(data)
    assert err.value.field_name == field
    assert "clip-1" in str(err.value) and field in str(err.value)


def test_bad_line_in_a_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(full_record().to_dict())
    path.write_text(good + "\n" + "{not json\n")
    with pytest.raises(RecordError, match="bad.jsonl:2"):
        read_records(path)


def test_audio_paths_cannot_escape_the_data_root(tmp_path):
    (tmp_path / "root" / "wav").mkdir(parents=True)
    (tmp_path / "outside.wav").write_bytes(b"x")
    rec = full_record()
    assert rec.audio_path(tmp_path / "root") == (tmp_path / "root" / "wav" / "a.wav").resolve()
    for bad in ("../outside.wav", "/etc/passwd", "wav/../../outside.wav"):
        with pytest.raises(UnsafePathError, match="audio"):
            full_record(audio=bad).audio_path(tmp_path / "root")
    (tmp_path / "root" / "link.wav").symlink_to(tmp_path / "outside.wav")
    with pytest.raises(UnsafePathError):
        full_record(audio="link.wav").audio_path(tmp_path / "root")


def test_label_maps_and_soft_labels():
    assert normalize_emotion("exc", "iemocap") == "happy"
    assert normalize_emotion("H", "msp_podcast") == "happy"
    assert normalize_emotion("X", "msp_podcast") is None
    assert normalize_emotion("joy", "meld") == "happy"
    assert normalize_emotion("05", "ravdess") == "angry"
    dist = vote_distribution(["angry", "angry", "frustrated", "sad", None], ["angry", "frustrated", "sad", "happy"])
    assert dist == {"angry": 0.5, "frustrated": 0.25, "sad": 0.25, "happy": 0.0}
    assert consensus_label(dist) == "angry"
    assert consensus_label({"angry": 0.5, "sad": 0.5}) is None
    assert multi_label(dist) == ["angry"]  # 1/C = 0.25: ties at the threshold are not "present"
    assert entropy({"angry": 1.0}) == 0.0
    assert entropy({"angry": 0.5, "sad": 0.5}) == pytest.approx(1.0)
