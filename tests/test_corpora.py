"""Corpus adapters on miniature trees with each corpus's real file names and label formats."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emoreason.data.audio import write_wav
from emoreason.data.corpora import ADAPTERS, CorpusError, get_adapter, load_corpus


def tone(path, seconds=0.3, rate=16_000):
    t = np.arange(int(seconds * rate)) / rate
    return write_wav(path, 0.3 * np.sin(2 * np.pi * 180 * t), rate)


def by_id(load):
    return {r.id: r for r in load.records}


def test_registry_names_every_adapter():
    assert set(ADAPTERS) == {"iemocap", "msp_podcast", "crema_d", "ravdess", "meld", "esd", "manifest", "synthetic"}
    for name in ADAPTERS:
        assert callable(get_adapter(name))
    with pytest.raises(CorpusError, match="unknown corpus adapter 'nope'"):
        get_adapter("nope")


IEMOCAP_EVAL = """% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
C-E2:\tNeutral state;\t()
C-E3:\tNeutral state;\t()
C-E4:\tNeutral state; Frustration;\t()
C-F1:\tNeutral state;\t()
A-E3:\tval 3; act 2; dom  2;\t()
A-E4:\tval 2; act 3; dom  3;\t()

[10.0100 - 11.3925]\tSes01F_impro01_M000\tfru\t[2.0000, 3.5000, 3.5000]
C-E2:\tFrustration;\t()
C-E3:\tAnger; Frustration;\t()
C-E4:\tFrustration;\t()
A-E3:\tval 2; act 4; dom  4;\t()

[14.0000 - 15.0000]\tSes01F_impro01_F001\txxx\t[2.5000, 3.0000, 3.0000]
C-E2:\tExcited;\t()
C-E3:\tSadness;\t()
"""
IEMOCAP_TRANSCRIPT = """Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.
Ses01F_impro01_M000 [010.0100-011.3925]: Do you have your forms?
Ses01F_impro01_F001 [014.0000-015.0000]: Yeah.
"""


def test_iemocap_votes_dimensions_context_and_splits(tmp_path):
    for session in (1, 5):
        base = tmp_path / f"Session{session}"
        (base / "dialog" / "EmoEvaluation").mkdir(parents=True)
        (base / "dialog" / "transcriptions").mkdir(parents=True)
        name = "Ses01F_impro01" if session == 1 else "Ses05F_impro01"
        (base / "dialog" / "EmoEvaluation" / f"{name}.txt").write_text(IEMOCAP_EVAL.replace("Ses01F", name[:6]))
        (base / "dialog" / "transcriptions" / f"{name}.txt").write_text(
            IEMOCAP_TRANSCRIPT.replace("Ses01F", name[:6]))
        for turn in ("F000", "M000", "F001"):
            if session == 1 and turn == "F001":
                continue  # missing audio -> reported, not dropped silently
            tone(base / "sentences" / "wav" / name / f"{name}_{turn}.wav")
    load = load_corpus("iemocap", tmp_path)
    recs = by_id(load)
    first = recs["Ses01F_impro01_F000"]
    assert [v.rater for v in first.votes] == ["E2", "E3", "E4"]  # self-rating C-F1 excluded by default
    assert first.votes[2].secondary == ["frustrated"]
    assert first.votes[1].valence == 3.0 and first.votes[1].arousal == 2.0 and first.votes[1].dominance == 2.0
    assert first.distribution == {"neutral": 1.0} and first.label == "neutral"
    assert first.gender == "female" and first.speaker == "Ses01F" and first.transcript == "Excuse me."
    assert first.valence == 2.5 and first.split == "train"
    second = recs["Ses01F_impro01_M000"]
    assert second.gender == "male" and second.speaker == "Ses01M" and second.label == "frustrated"
    assert second.distribution == pytest.approx({"frustrated": 2 / 3, "angry": 1 / 3})
    assert second.context == ["F: Excuse me."]
    assert abs(second.duration - 1.3825) < 1e-6
    tied = recs["Ses05F_impro01_F001"]  # header says xxx: consensus from the votes, here a tie -> None
    assert tied.label is None and tied.distribution == {"happy": 0.5, "sad": 0.5}
    assert tied.split == "test" and tied.context == ["F: Excuse me.", "M: Do you have your forms?"]
    assert [e["id"] for e in load.errors] == ["Ses01F_impro01_F001"]
    assert "file not found" in load.errors[0]["reason"]


def test_msp_podcast_consensus_and_detailed(tmp_path):
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Labels" / "labels_consensus.csv").write_text(
        "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"
        "MSP-PODCAST_0001_0008.wav,A,5.2,2.0,5.0,127,Female,Train\n"
        "MSP-PODCAST_0002_0010.wav,X,3.0,4.0,3.0,45,Male,Test1\n"
        "MSP-PODCAST_0003_0001.wav,N,4.0,4.0,4.0,46,Male,Development\n")
    (tmp_path / "Labels" / "labels_detailed.csv").write_text(
        "FileName,WorkerID,EmoClass,EmoClass_Second,EmoAct,EmoVal,EmoDom\n"
        "MSP-PODCAST_0001_0008.wav,W1,Angry,\"Frustrated,Annoyed\",6,2,5\n"
        "MSP-PODCAST_0001_0008.wav,W2,Angry,,5,2,5\n"
        "MSP-PODCAST_0001_0008.wav,W3,Contempt,,4,3,4\n"
        "MSP-PODCAST_0002_0010.wav,W1,Happy,,3,5,3\n"
        "MSP-PODCAST_0002_0010.wav,W4,Sad,,3,2,3\n")
    (tmp_path / "Transcripts").mkdir()
    (tmp_path / "Transcripts" / "MSP-PODCAST_0001_0008.txt").write_text("I told you twice already.\n")
    for name in ("MSP-PODCAST_0001_0008.wav", "MSP-PODCAST_0002_0010.wav", "MSP-PODCAST_0003_0001.wav"):
        tone(tmp_path / "Audios" / name)
    recs = by_id(load_corpus("msp_podcast", tmp_path))
    angry = recs["MSP-PODCAST_0001_0008"]
    assert angry.label == "angry" and angry.gender == "female" and angry.split == "train" and angry.speaker == "127"
    assert angry.distribution == pytest.approx({"angry": 2 / 3, "contempt": 1 / 3})
    assert angry.votes[0].secondary == ["frustrated", "angry"] and angry.votes[0].arousal == 6.0
    assert angry.transcript == "I told you twice already." and angry.arousal == 5.2
    no_agreement = recs["MSP-PODCAST_0002_0010"]
    assert no_agreement.label is None and no_agreement.split == "test"  # X + a 1/1 tie
    no_votes = recs["MSP-PODCAST_0003_0001"]
    assert no_votes.split == "validation" and no_votes.distribution == {"neutral": 1.0}


def test_crema_d_per_rater_votes_voice_only(tmp_path):
    for name in ("1001_DFA_ANG_XX", "1002_IEO_SAD_HI"):
        tone(tmp_path / "AudioWAV" / f"{name}.wav")
    (tmp_path / "AudioWAV" / "readme.wav").write_bytes(b"")  # not coded like a clip -> reported
    (tmp_path / "VideoDemographics.csv").write_text("ActorID,Age,Sex,Race,Ethnicity\n"
                                                   "1001,51,Male,Caucasian,Not Hispanic\n"
                                                   "1002,21,Female,Caucasian,Not Hispanic\n")
    (tmp_path / "finishedResponses.csv").write_text(
        ",localid,pos,ans,ttr,queryType,numTries,clipNum,questNum,subType,clipName,sessionNums,respEmo,respLevel,"
        "dispEmo,dispVal,dispLevel\n"
        "0,r1,0,A_50,1000,1,0,1,1,1,1001_DFA_ANG_XX,1,A,50,A,0,50\n"
        "1,r2,0,A_60,1000,1,0,1,1,1,1001_DFA_ANG_XX,1,A,60,A,0,60\n"
        "2,r3,0,D_40,1000,1,0,1,1,1,1001_DFA_ANG_XX,1,D,40,D,0,40\n"
        "3,r4,0,H_40,1000,2,0,1,1,1,1001_DFA_ANG_XX,1,H,40,H,0,40\n")
    load = load_corpus("crema_d", tmp_path)
    recs = by_id(load)
    angry = recs["1001_DFA_ANG_XX"]
    assert [v.rater for v in angry.votes] == ["r1", "r2", "r3"]  # the face-only rating (queryType 2) is left out
    assert angry.distribution == pytest.approx({"angry": 2 / 3, "disgusted": 1 / 3}) and angry.label == "angry"
    assert angry.gender == "male" and angry.transcript == "Don't forget a jacket."
    sad = recs["1002_IEO_SAD_HI"]  # no ratings -> the intended emotion is the single vote
    assert sad.label == "sad" and sad.meta["intensity"] == "high" and sad.gender == "female"
    assert [e["id"] for e in load.errors] == ["readme"]


def test_crema_d_tabulated_votes(tmp_path):
    tone(tmp_path / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    (tmp_path / "processedResults").mkdir()
    (tmp_path / "processedResults" / "tabulatedVotes.csv").write_text(
        ",A,D,F,H,N,S,fileName,numResponses,agreement,emoVote,meanEmoResp\n"
        "0,6,0,0,0,4,0,1001_DFA_ANG_XX,10,0.6,A,55\n")
    rec = load_corpus("crema_d", tmp_path).records[0]
    assert len(rec.votes) == 10 and rec.distribution == pytest.approx({"angry": 0.6, "neutral": 0.4})


def test_ravdess_filename_coding(tmp_path):
    tone(tmp_path / "Actor_01" / "03-01-05-02-01-01-01.wav")
    tone(tmp_path / "Actor_02" / "03-01-02-01-02-02-02.wav")
    tone(tmp_path / "Actor_02" / "03-02-03-01-02-02-02.wav")  # song: skipped by default
    recs = by_id(load_corpus("ravdess", tmp_path))
    assert set(recs) == {"ravdess_03-01-05-02-01-01-01", "ravdess_03-01-02-01-02-02-02"}
    angry = recs["ravdess_03-01-05-02-01-01-01"]
    assert angry.label == "angry" and angry.gender == "male" and angry.meta["intensity"] == "strong"
    assert angry.transcript == "Kids are talking by the door."
    calm = recs["ravdess_03-01-02-01-02-02-02"]
    assert calm.label == "calm" and calm.gender == "female" and calm.speaker == "actor_02"


def test_meld_context_and_preextracted_audio(tmp_path):
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    (tmp_path / "train_sent_emo.csv").write_text(
        header + '1,"Oh my God, he\'s lost it.",Monica,surprise,negative,0,0,8,21,"00:16:16,059","00:16:21,731"\n'
        '2,What?,Joey,neutral,neutral,0,1,8,21,"00:16:21,940","00:16:23,442"\n'
        '3,I hate this.,Ross,anger,negative,0,2,8,21,"00:16:24,000","00:16:25,000"\n')
    (tmp_path / "test_sent_emo.csv").write_text(header + "1,Hi.,Rachel,joy,positive,3,0,1,1,a,b\n")
    for split, name in (("train", "dia0_utt0"), ("train", "dia0_utt1"), ("test", "dia3_utt0")):
        tone(tmp_path / "audio" / split / f"{name}.wav")
    load = load_corpus("meld", tmp_path)
    recs = by_id(load)
    assert recs["meld_train_dia0_utt1"].context == ["Monica: Oh my God, he's lost it."]
    assert recs["meld_train_dia0_utt0"].label == "surprised" and recs["meld_test_dia3_utt0"].label == "happy"
    assert recs["meld_test_dia3_utt0"].split == "test"
    # dia0_utt2 has neither extracted audio nor a video: reported with the reason
    assert [e["id"] for e in load.errors] == ["meld_train_dia0_utt2"]


def test_meld_extraction_without_ffmpeg_is_reported(tmp_path, monkeypatch):
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    (tmp_path / "dev_sent_emo.csv").write_text(header + "1,Hi.,Rachel,joy,positive,1,0,1,1,a,b\n")
    (tmp_path / "dev_splits_complete").mkdir()
    (tmp_path / "dev_splits_complete" / "dia1_utt0.mp4").write_bytes(b"not a video")
    monkeypatch.setattr("shutil.which", lambda name: None)
    load = load_corpus("meld", tmp_path)
    assert not load.records and "ffmpeg is not installed" in load.errors[0]["reason"]


def test_esd_folder_splits_and_transcripts(tmp_path):
    speaker = tmp_path / "0011"
    tone(speaker / "Angry" / "train" / "0011_000351.wav")
    tone(speaker / "Happy" / "test" / "0011_000731.wav")
    tone(speaker / "Neutral" / "0011_000005.wav")  # no split folder: utterance number decides
    (speaker / "0011.txt").write_text("0011_000351\tThe nine the eggs.\tAngry\n0011_000005\tI am here.\tNeutral\n",
                                      encoding="utf-16")
    recs = by_id(load_corpus("esd", tmp_path, genders={"11": "male"}))
    assert recs["esd_0011_000351"].label == "angry" and recs["esd_0011_000351"].split == "train"
    assert recs["esd_0011_000351"].transcript == "The nine the eggs." and recs["esd_0011_000351"].gender == "male"
    assert recs["esd_0011_000731"].label == "happy" and recs["esd_0011_000731"].split == "test"
    assert recs["esd_0011_000005"].split == "train" and recs["esd_0011_000005"].meta["language"] == "english"


def test_generic_manifest_csv_and_jsonl(tmp_path):
    tone(tmp_path / "clips" / "a.wav")
    tone(tmp_path / "clips" / "b.wav")
    (tmp_path / "manifest.csv").write_text(
        "path,emotions,text,spk,sex\nclips/a.wav,anger;anger;joy,Go away.,s1,F\nclips/b.wav,sad,,s2,m\n")
    cols = {"audio": "path", "votes": "emotions", "transcript": "text", "speaker": "spk", "gender": "sex"}
    recs = by_id(load_corpus("manifest", tmp_path, manifest="manifest.csv", columns=cols, corpus="mine"))
    assert recs["a"].distribution == pytest.approx({"angry": 2 / 3, "happy": 1 / 3}) and recs["a"].label == "angry"
    assert recs["a"].gender == "female" and recs["a"].corpus == "mine" and recs["b"].gender == "male"
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "x", "audio": "clips/a.wav", "label": "fear"}) + "\n"
                                      + json.dumps({"id": "y", "audio": "../outside.wav", "label": "sad"}) + "\n")
    load = load_corpus("manifest", tmp_path, manifest="m.jsonl")
    assert by_id(load)["x"].label == "fearful"
    assert load.errors[0]["id"] == "y" and "escapes the data root" in load.errors[0]["reason"]
    (tmp_path / "bad.csv").write_text("audio,label\nclips/a.wav,bored-ish\n")
    with pytest.raises(ValueError, match=r"bad.csv:2.*unknown emotion label"):
        load_corpus("manifest", tmp_path, manifest="bad.csv")


def test_synthetic_adapter_reads_the_espeak_manifest(synth_corpus):
    load = load_corpus("synthetic", synth_corpus.parent)
    assert len(load.records) > 100 and not load.errors
    assert {r.split for r in load.records} == {"train", "validation", "test"}
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus("synthetic", synth_corpus.parent / "missing")


def test_unknown_adapter_option_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match=r"unknown option\(s\) \['sessions'\] for corpus adapter 'iemocap'"):
        load_corpus("iemocap", tmp_path, sessions=[1])
