"""The synthetic corpus carries emotion in the voice only: every sentence in every emotion, held-out voices and
held-out sentences in the test split, and a words-only classifier at chance on it (with a leaky control corpus on
which the same classifier is not)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from emoreason.data.schema import read_records
from emoreason.testing.synth_corpus import (
    HELD_OUT_SPEAKERS,
    SYNTH_EMOTIONS,
    TRAIN_SENTENCES,
    corpus_plan,
    transcript_only_predictions,
    unseen_sentence_clips,
)


@pytest.fixture(scope="module")
def records(synth_corpus):
    return read_records(synth_corpus)


def _accuracy(train, test):
    return sum(p == r.label for p, r in zip(transcript_only_predictions(train, test), test)) / len(test)


def test_every_speaker_says_each_of_its_sentences_in_every_emotion(records):
    by_speaker_sentence = Counter((r.speaker, r.transcript, r.meta["rendered_emotion"]) for r in records)
    assert set(by_speaker_sentence.values()) == {1}
    for speaker, text in {(r.speaker, r.transcript) for r in records}:
        assert {e for (s, t, e) in by_speaker_sentence if (s, t) == (speaker, text)} == set(SYNTH_EMOTIONS)
    # labels balanced per split, and the consensus label is the rendered emotion
    for split in ("train", "validation", "test"):
        counts = Counter(r.label for r in records if r.split == split)
        assert len(set(counts.values())) == 1 and set(counts) == set(SYNTH_EMOTIONS), (split, counts)
    assert all(r.label == r.meta["rendered_emotion"] for r in records)


def test_more_sentences_than_before_and_the_test_split_holds_out_voices_and_sentences(records):
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    assert len({r.transcript for r in records}) >= 20
    assert not {r.speaker for r in train} & {r.speaker for r in test}
    assert {r.speaker for r in records if r.split != "train"} == set(HELD_OUT_SPEAKERS)
    unseen = unseen_sentence_clips(records)
    assert len(unseen) >= 40 and len(unseen) < len(test)  # a few seen sentences stay, to separate the two effects
    assert not {r.transcript for r in unseen} & {r.transcript for r in train}
    assert all(not r.meta["sentence_in_training"] for r in unseen)
    assert Counter(r.label for r in unseen) == Counter({e: len(unseen) // 4 for e in SYNTH_EMOTIONS})


def test_a_transcript_only_classifier_is_at_chance_on_this_corpus_but_not_on_a_leaky_one(records):
    train = [r for r in records if r.split == "train"]
    assert _accuracy(train, [r for r in records if r.split == "test"]) <= 0.3
    assert _accuracy(train, unseen_sentence_clips(records)) <= 0.3
    # Control: the old layout, where each emotion used its own sentences, gives the label away in the words.
    own_sentence = {e: TRAIN_SENTENCES[i] for i, e in enumerate(SYNTH_EMOTIONS)}
    leaky = [dataclasses.replace(r, transcript=own_sentence[r.label]) for r in records]
    assert _accuracy([r for r in leaky if r.split == "train"], [r for r in leaky if r.split == "test"]) == 1.0


def test_the_plan_validates_its_sizes():
    assert len(corpus_plan(train_speakers=12)) == 12 * 8 + 3 * 8
    with pytest.raises(ValueError, match="train_speakers"):
        corpus_plan(train_speakers=0)
    with pytest.raises(ValueError, match="sentences_per_speaker"):
        corpus_plan(sentences_per_speaker=99)


def test_augmentation_re_renders_training_clips_only_with_other_prosody(tmp_path):
    from emoreason.testing.synth_corpus import synthesize

    records = read_records(synthesize(tmp_path / "c", train_speakers=1, sentences_per_speaker=1, augment=1))
    augmented = [r for r in records if r.id.endswith("_aug0")]
    assert len(augmented) == 4 and all(r.split == "train" for r in augmented)
    by_id = {r.id: r for r in records}
    for r in augmented:
        original = by_id[r.id.removesuffix("_aug0")]
        assert (r.label, r.transcript, r.votes) == (original.label, original.transcript, original.votes)
    assert any(r.meta["espeak"] != by_id[r.id.removesuffix("_aug0")].meta["espeak"] for r in augmented)
