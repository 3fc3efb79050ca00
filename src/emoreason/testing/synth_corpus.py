"""A synthetic emotional-speech corpus rendered with espeak-ng, with simulated annotator votes.

Emotion is carried by prosody only: every emotion uses the same pool of neutral sentences, and each emotion has its
own pitch level, pitch excursion, speaking rate and amplitude (with per-speaker and per-clip jitter). Some clips are rendered between two
emotions and get split votes, so ambiguity-aware code has something to chew on. Speakers are espeak-ng voice variants
(female and male); whole speakers are held out for validation and test, as real SER evaluations do.

Files are written at espeak-ng's native 22.05 kHz so that every consumer exercises the resampling path.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
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

SENTENCES = (
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
)


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str
    gender: str
    pitch_offset: int


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
SPLIT_OF_SPEAKER = {"spk_f4": "validation", "spk_m4": "test", "spk_f5": "test"}


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


def synthesize(
    out_dir: str | Path,
    clips_per_emotion: int = 6,
    speakers: int = len(SPEAKERS),
    ambiguous_share: float = 0.2,
    raters: int = 5,
    seed: int = 0,
    workers: int = 4,
) -> Path:
    """Render the corpus under ``out_dir`` (the data root) and write ``records.jsonl``; returns the manifest path.

    ``clips_per_emotion`` is per speaker. Re-running with the same arguments is a no-op (existing manifest kept).
    """
    out = Path(out_dir)
    manifest = out / "records.jsonl"
    if manifest.exists():
        return manifest
    rng = random.Random(seed)
    jobs = []
    for speaker in SPEAKERS[:speakers]:
        split = SPLIT_OF_SPEAKER.get(speaker.id, "train")
        for emotion in SYNTH_EMOTIONS:
            for k in range(clips_per_emotion):
                text = SENTENCES[(k * 5 + SYNTH_EMOTIONS.index(emotion) * 3 + len(jobs)) % len(SENTENCES)]
                params = dict(PROSODY[emotion])
                secondary = None
                if rng.random() < ambiguous_share:
                    secondary = rng.choice([e for e in SYNTH_EMOTIONS if e != emotion])
                    params = _blend(params, PROSODY[secondary], 0.4)
                params["pitch"] = min(99, max(0, params["pitch"] + speaker.pitch_offset + rng.randint(-4, 4)))
                params["rate"] = max(80, params["rate"] + rng.randint(-10, 10))
                params["amplitude"] = min(200, max(10, params["amplitude"] + rng.randint(-8, 8)))
                votes = _simulate_votes(rng, emotion, secondary, raters)
                clip_id = f"synth_{speaker.id}_{emotion}_{k:03d}"
                jobs.append((clip_id, speaker, split, emotion, secondary, text, params, votes))

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp)

        def run(job):
            clip_id, speaker, *_rest, params, _votes = job
            return render(job[5], staging / "wav" / speaker.id / f"{clip_id}.wav", speaker.voice, **params)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, jobs))
        out.mkdir(parents=True, exist_ok=True)
        if (out / "wav").exists():
            shutil.rmtree(out / "wav")
        shutil.move(str(staging / "wav"), str(out / "wav"))

    records = []
    for clip_id, speaker, split, emotion, secondary, text, params, votes in jobs:
        rel = f"wav/{speaker.id}/{clip_id}.wav"
        dist = vote_distribution([v.emotion for v in votes], SYNTH_EMOTIONS)
        records.append(
            EmotionRecord(
                id=clip_id, audio=rel, duration=round(duration_of(out / rel), 4), corpus="synthetic", split=split,
                speaker=speaker.id, gender=speaker.gender, transcript=text,
                label=consensus_label(dist) or emotion, votes=votes, distribution=dist,
                meta={"rendered_emotion": emotion, "blended_with": secondary, "espeak": params,
                      "voice": speaker.voice},
            )
        )
    return write_records(records, manifest)


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
    parser.add_argument("--clips-per-emotion", type=int, default=6, help="per speaker")
    parser.add_argument("--speakers", type=int, default=len(SPEAKERS))
    parser.add_argument("--ambiguous-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(synthesize(args.out_dir, args.clips_per_emotion, args.speakers, args.ambiguous_share, seed=args.seed))
    return 0
