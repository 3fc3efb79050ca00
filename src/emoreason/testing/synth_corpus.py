"""A synthetic emotional-speech corpus rendered with espeak-ng, with simulated annotator votes.

Emotion is carried by prosody only. Each emotion has its own pitch level, pitch excursion, speaking rate and amplitude
(with per-speaker and per-clip jitter), and the words carry nothing: every speaker renders each of its sentences once in
every emotion. Some clips are rendered between two emotions and get split votes, so ambiguity-aware code has something
to chew on. Speakers are espeak-ng voice variants (female and male). The test split holds out both voices and
sentences: held-out speakers mostly say sentences no training clip uses, so a model cannot score by recognising a
sentence x voice x emotion combination it has heard (``unseen_sentence_clips``), and a words-only classifier
(``transcript_only_predictions``) sits at chance.

Files are written at espeak-ng's native 22.05 kHz so that every consumer exercises the resampling path.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from ..data.audio import duration_of
from ..data.labels import consensus_label, vote_distribution
from ..data.schema import EmotionRecord, Vote, write_records

SYNTH_EMOTIONS = ("neutral", "happy", "sad", "angry")

# espeak-ng controls: -p pitch (0-99, relative to the voice's own range), -s rate (words per minute), -a amplitude
# (0-200), and the SSML <prosody range="N%"> pitch excursion (10-200 %: about 1 to 9 semitones on one sentence).
# The profiles follow the direction of the vocal cues surveyed by Juslin & Laukka (2003, Psychological Bulletin 129):
# happiness high and varied pitch, sadness low, flat, slow and soft, anger loud and fast. Pitch level alone is not a
# speaker-independent cue (a high-pitched voice's neutral sits near a low one's happy), so every emotion differs
# from its neighbours in at least two of level, excursion, rate and loudness.
PROSODY = {
    "neutral": {"pitch": 45, "rate": 160, "amplitude": 90, "pitch_range": 100},
    "happy": {"pitch": 75, "rate": 190, "amplitude": 120, "pitch_range": 200},
    "sad": {"pitch": 20, "rate": 115, "amplitude": 50, "pitch_range": 25},
    "angry": {"pitch": 50, "rate": 220, "amplitude": 190, "pitch_range": 60},
}

# Training sentences, then held-out sentences. Every speaker renders each of its sentences in every emotion, so the
# words say nothing about the label; the held-out sentences occur only in the validation and test splits, so a model
# that memorised sentence x voice x emotion combinations cannot score on them.
TRAIN_SENTENCES = (
    "We need to talk about the schedule.",
    "The meeting starts at nine tomorrow morning.",
    "Please put the boxes near the door.",
    "The weather will change later this week.",
    "I saw the report on the table.",
    "She opened the window and looked outside.",
    "They are coming back on Sunday.",
    "Turn left after the second light.",
    "My brother bought a new bicycle.",
    "The train leaves in ten minutes.",
    "Dinner is ready in the kitchen.",
    "I can't believe it.",
    "The library closes early on Fridays.",
    "He parked the car across the street.",
    "Our neighbours painted their fence green.",
    "The printer on the third floor is working again.",
)
HELD_OUT_SENTENCES = (
    "The keys are in the blue drawer.",
    "We moved the piano into the hall.",
    "Your parcel arrived this afternoon.",
    "The bus was twenty minutes late.",
    "She wrote the numbers on a card.",
    "They planted tomatoes behind the house.",
    "The lamp in the corner needs a bulb.",
    "I will call you after lunch.",
)
SENTENCES = TRAIN_SENTENCES + HELD_OUT_SENTENCES


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str
    gender: str
    pitch_offset: int


# Training voices first; the last three are held out (one for validation, two for test).
SPEAKERS = (
    Speaker("spk_f1", "en-us+f1", "female", 4),
    Speaker("spk_m1", "en-us+m1", "male", -4),
    Speaker("spk_f2", "en-us+f2", "female", 0),
    Speaker("spk_m2", "en-us+m3", "male", 0),
    Speaker("spk_f3", "en+f3", "female", -3),
    Speaker("spk_m3", "en+m2", "male", 3),
    Speaker("spk_f4", "en-us+f4", "female", 2),  # validation
    Speaker("spk_m4", "en+m4", "male", -2),  # test
    Speaker("spk_f5", "en+f5", "female", -1),  # test
)
# Extra training voices for larger corpora (``train_speakers`` above 6); never held out.
EXTRA_TRAIN_SPEAKERS = (
    Speaker("spk_m5", "en-us+m5", "male", 1),
    Speaker("spk_f6", "en-us+linda", "female", -2),
    Speaker("spk_m6", "en+m6", "male", 2),
    Speaker("spk_f7", "en+Annie", "female", 1),
    Speaker("spk_m7", "en-us+m7", "male", -1),
    Speaker("spk_f8", "en+belinda", "female", 3),
)
HELD_OUT_SPEAKERS = {"spk_f4": "validation", "spk_m4": "test", "spk_f5": "test"}
SPLIT_OF_SPEAKER = HELD_OUT_SPEAKERS
# Sentences a held-out speaker renders: all but ``SEEN_PER_HELD_OUT`` come from the held-out pool; the seen ones let
# an evaluation separate "new voice" from "new voice and new words".
SEEN_PER_HELD_OUT = 2


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def render(text: str, path: Path, voice: str, pitch: int, rate: int, amplitude: int,
           pitch_range: int | None = None) -> Path:
    """Synthesise one utterance to a WAV file with espeak-ng (``pitch_range`` in percent, through SSML)."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed: `apt-get install espeak-ng` (make setup does it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(rate), "-a", str(amplitude), "-w", str(path)]
    if pitch_range is not None:
        cmd += ["-m", f'<speak><prosody range="{pitch_range}%">{xml_escape(text)}</prosody></speak>']
    else:
        cmd.append(text)
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return path


def _blend(a: dict, b: dict, weight: float) -> dict:
    return {k: round(a[k] * (1 - weight) + b[k] * weight) for k in a}


def corpus_plan(train_speakers: int = 6, sentences_per_speaker: int = 8) -> list[tuple[Speaker, str, int]]:
    """(speaker, split, sentence index) for every speaker x sentence the corpus renders (each in every emotion).

    Training speakers take overlapping windows of the training sentences (each window ``sentences_per_speaker``
    long), so every training sentence is spoken by several voices. Held-out speakers render ``SEEN_PER_HELD_OUT``
    training sentences and the rest from the held-out pool, which no training clip uses.
    """
    pool = [*SPEAKERS[:6], *EXTRA_TRAIN_SPEAKERS]
    if not 1 <= train_speakers <= len(pool):
        raise ValueError(f"train_speakers must be between 1 and {len(pool)}, got {train_speakers}")
    n_train, n_held = len(TRAIN_SENTENCES), len(HELD_OUT_SENTENCES)
    if not 1 <= sentences_per_speaker <= n_train:
        raise ValueError(f"sentences_per_speaker must be between 1 and {n_train}, got {sentences_per_speaker}")
    plan = []
    for i, speaker in enumerate(pool[:train_speakers]):
        start = i * n_train // train_speakers
        plan += [(speaker, "train", (start + j) % n_train) for j in range(sentences_per_speaker)]
    held = min(sentences_per_speaker, n_held + SEEN_PER_HELD_OUT)
    for i, speaker in enumerate(s for s in SPEAKERS if s.id in HELD_OUT_SPEAKERS):
        seen = [(i * 5 + j * 7) % n_train for j in range(SEEN_PER_HELD_OUT)]
        unseen = [n_train + (i * 3 + j) % n_held for j in range(held - SEEN_PER_HELD_OUT)]
        plan += [(speaker, HELD_OUT_SPEAKERS[speaker.id], k) for k in seen + unseen]
    return plan


def synthesize(
    out_dir: str | Path,
    train_speakers: int = 6,
    sentences_per_speaker: int = 8,
    ambiguous_share: float = 0.2,
    raters: int = 5,
    seed: int = 0,
    workers: int = 4,
    augment: int = 0,
) -> Path:
    """Render the corpus under ``out_dir`` (the data root) and write ``records.jsonl``; returns the manifest path.

    Every planned speaker x sentence is rendered once in each emotion (see ``corpus_plan``); ``augment`` adds that
    many re-renderings of every training clip with a wider pitch and rate jitter (speed/pitch perturbation, ids ending
    ``_augK``, same votes). Re-running with the same arguments is a no-op (existing manifest kept).
    """
    out = Path(out_dir)
    manifest = out / "records.jsonl"
    if manifest.exists():
        return manifest
    rng = random.Random(seed)
    jobs = []
    for speaker, split, sentence in corpus_plan(train_speakers, sentences_per_speaker):
        for emotion in SYNTH_EMOTIONS:
            params = dict(PROSODY[emotion])
            secondary = None
            if rng.random() < ambiguous_share:
                secondary = rng.choice([e for e in SYNTH_EMOTIONS if e != emotion])
                params = _blend(params, PROSODY[secondary], 0.4)
            params["pitch"] = min(99, max(0, params["pitch"] + speaker.pitch_offset + rng.randint(-4, 4)))
            params["rate"] = max(80, params["rate"] + rng.randint(-10, 10))
            params["amplitude"] = min(200, max(10, params["amplitude"] + rng.randint(-8, 8)))
            votes = _simulate_votes(rng, emotion, secondary, raters)
            clip_id = f"synth_{speaker.id}_{emotion}_s{sentence:02d}"
            jobs.append((clip_id, speaker, split, emotion, secondary, sentence, params, votes))
            # Speed/pitch perturbation of training clips: the same utterance re-rendered with a wider jitter.
            for k in range(augment if split == "train" else 0):
                varied = dict(params)
                varied["pitch"] = min(99, max(0, params["pitch"] + rng.randint(-8, 8)))
                varied["rate"] = max(80, round(params["rate"] * rng.uniform(0.9, 1.1)))
                jobs.append((f"{clip_id}_aug{k}", speaker, split, emotion, secondary, sentence, varied, votes))

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp)

        def run(job):
            clip_id, speaker, _split, _emotion, _secondary, sentence, params, _votes = job
            return render(SENTENCES[sentence], staging / "wav" / speaker.id / f"{clip_id}.wav", speaker.voice,
                          **params)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, jobs))
        out.mkdir(parents=True, exist_ok=True)
        if (out / "wav").exists():
            shutil.rmtree(out / "wav")
        shutil.move(str(staging / "wav"), str(out / "wav"))

    records = []
    for clip_id, speaker, split, emotion, secondary, sentence, params, votes in jobs:
        rel = f"wav/{speaker.id}/{clip_id}.wav"
        dist = vote_distribution([v.emotion for v in votes], SYNTH_EMOTIONS)
        records.append(
            EmotionRecord(
                id=clip_id, audio=rel, duration=round(duration_of(out / rel), 4), corpus="synthetic", split=split,
                speaker=speaker.id, gender=speaker.gender, transcript=SENTENCES[sentence],
                label=consensus_label(dist) or emotion, votes=votes, distribution=dist,
                meta={"rendered_emotion": emotion, "blended_with": secondary, "espeak": params,
                      "voice": speaker.voice, "sentence": sentence,
                      "sentence_in_training": sentence < len(TRAIN_SENTENCES)},
            )
        )
    return write_records(records, manifest)


def unseen_sentence_clips(records: Sequence) -> list:
    """Held-out-speaker test clips whose sentence no training clip uses (records or row dicts with ``meta``)."""
    train_texts = {_field(r, "transcript") for r in records if _field(r, "split") == "train"}
    return [r for r in records if _field(r, "split") == "test" and _field(r, "transcript") not in train_texts]


def transcript_only_predictions(train: Sequence, test: Sequence, labels: Sequence[str] = SYNTH_EMOTIONS) -> list[str]:
    """A words-only classifier: multinomial naive Bayes on the transcript's lower-cased words (add-one smoothing),
    ties broken by the training label frequency, then by label order. On this corpus it must sit at chance; on a
    corpus whose sentences go with emotions it does not (the control in tests/test_synth_corpus.py)."""
    counts = {label: Counter() for label in labels}
    prior = Counter(_field(r, "label") for r in train)
    for r in train:
        counts[_field(r, "label")].update(_words(_field(r, "transcript")))
    vocab = set().union(*counts.values())
    totals = {label: sum(c.values()) for label, c in counts.items()}
    predictions = []
    for r in test:
        words = _words(_field(r, "transcript"))

        def score(label: str) -> tuple[float, int, int]:
            log_likelihood = sum(math.log((counts[label][w] + 1) / (totals[label] + len(vocab) + 1)) for w in words)
            return (log_likelihood, prior[label], -list(labels).index(label))

        predictions.append(max(labels, key=score))
    return predictions


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _field(record, name: str):
    return record[name] if isinstance(record, dict) else getattr(record, name)


def _simulate_votes(rng: random.Random, emotion: str, secondary: str | None, raters: int) -> list[Vote]:
    """Clear clips: most raters agree, one may slip. Blended clips: a 3/2-style split toward the second emotion."""
    labels = []
    for _ in range(raters):
        r = rng.random()
        if secondary is not None:
            labels.append(secondary if r < 0.4 else emotion)
        else:
            labels.append(emotion if r < 0.9 else rng.choice(SYNTH_EMOTIONS))
    # Keep the rendered emotion the plurality, so the consensus label is well defined.
    i = 0
    while labels.count(emotion) <= max(labels.count(e) for e in SYNTH_EMOTIONS if e != emotion):
        labels[i] = emotion
        i += 1
    return [Vote(rater=f"rater_{i}", emotion=label) for i, label in enumerate(labels)]


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emoreason synth-corpus", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--train-speakers", type=int, default=6, help="training voices (held-out voices: always 3)")
    parser.add_argument("--sentences-per-speaker", type=int, default=8,
                        help="sentences each voice renders, each in every emotion")
    parser.add_argument("--ambiguous-share", type=float, default=0.2)
    parser.add_argument("--augment", type=int, default=0,
                        help="extra pitch/rate-perturbed renderings of every training clip")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(synthesize(args.out_dir, args.train_speakers, args.sentences_per_speaker, args.ambiguous_share,
                     seed=args.seed, augment=args.augment))
    return 0
