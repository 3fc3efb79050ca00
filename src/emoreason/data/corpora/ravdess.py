"""RAVDESS: ``Actor_XX/MM-VV-EE-II-SS-RR-AA.wav``, all coded in the file name.

MM modality (01 AV, 02 video, 03 audio), VV vocal channel (01 speech, 02 song), EE emotion (01 neutral, 02 calm,
03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised), II intensity (01 normal, 02 strong), SS statement
(01 "Kids are talking by the door", 02 "Dogs are sitting by the door"), RR repetition, AA actor (odd male, even
female). There are no per-rater votes in the release, so the acted emotion is the single vote. Split: by actor hash.
"""

from __future__ import annotations

from pathlib import Path

from ..labels import normalize_emotion
from ..schema import Vote
from . import CorpusLoad, make_record, speaker_split

STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}
INTENSITY = {"01": "normal", "02": "strong"}


def load(root: Path, include_song: bool = False, validation: float = 0.1, test: float = 0.1) -> CorpusLoad:
    result = CorpusLoad()
    for wav in sorted(root.glob("Actor_*/*.wav")):
        parts = wav.stem.split("-")
        rel = wav.relative_to(root).as_posix()
        if len(parts) != 7:
            result.errors.append({"id": wav.stem, "audio": rel, "corpus": "ravdess",
                                  "reason": "file name is not MM-VV-EE-II-SS-RR-AA"})
            continue
        modality, channel, emotion_code, intensity, statement, repetition, actor = parts
        if modality == "02" or (channel == "02" and not include_song):
            continue
        emotion = normalize_emotion(emotion_code, "ravdess")
        make_record(
            result, root, id=f"ravdess_{wav.stem}", audio=rel, corpus="ravdess",
            votes=[Vote(rater="acted", emotion=emotion)], split=speaker_split(actor, validation, test, "ravdess"),
            speaker=f"actor_{actor}", gender="male" if int(actor) % 2 else "female",
            transcript=STATEMENTS.get(statement),
            meta={"intensity": INTENSITY.get(intensity, intensity), "repetition": int(repetition),
                  "vocal_channel": "song" if channel == "02" else "speech"},
        )
    return result
