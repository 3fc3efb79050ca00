"""CREMA-D: ``AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav`` (e.g. ``1001_DFA_ANG_XX.wav``).

Votes come from the per-rater responses ``finishedResponses.csv`` (one row per rating: ``localid`` the rater,
``clipName``, ``queryType`` 1 = voice only, 2 = face only, 3 = audio-visual, ``respEmo`` A D F H N S, ``respLevel``);
by default only voice-only ratings count, as this is a speech corpus. Failing that, the tabulated counts
``processedResults/tabulatedVotes.csv`` (columns A D F H N S and ``fileName``) are expanded into anonymous votes.
Without either, the intended emotion from the file name is the single vote. Gender from ``VideoDemographics.csv``.
Split: speaker-independent by a hash of the actor id.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..labels import normalize_emotion
from ..schema import Vote
from . import CorpusLoad, make_record, read_text, speaker_split

SENTENCES = {
    "IEO": "It's eleven o'clock.", "TIE": "That is exactly what happened.", "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.", "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.", "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.", "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.", "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes.",
}
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(read_text(path))))


def load(root: Path, query_types=(1,), validation: float = 0.1, test: float = 0.1) -> CorpusLoad:
    votes: dict[str, list[Vote]] = {}
    responses = root / "finishedResponses.csv"
    tabulated = root / "processedResults" / "tabulatedVotes.csv"
    if responses.is_file():
        for row in _csv(responses):
            if query_types and int(float(row.get("queryType") or 0)) not in query_types:
                continue
            emotion = normalize_emotion(row["respEmo"], "crema_d") if row.get("respEmo") else None
            votes.setdefault(row["clipName"], []).append(Vote(rater=str(row.get("localid") or len(votes)),
                                                              emotion=emotion))
    elif tabulated.is_file():
        for row in _csv(tabulated):
            name = Path(row["fileName"]).stem
            clip_votes = []
            for code in ("A", "D", "F", "H", "N", "S"):
                for k in range(int(float(row.get(code) or 0))):
                    clip_votes.append(Vote(rater=f"tab_{code}{k}", emotion=normalize_emotion(code, "crema_d")))
            votes[name] = clip_votes
    genders = {}
    demographics = root / "VideoDemographics.csv"
    if demographics.is_file():
        for row in _csv(demographics):
            genders[str(row.get("ActorID"))] = (row.get("Sex") or "").strip().lower() or None

    result = CorpusLoad()
    for wav in sorted((root / "AudioWAV").glob("*.wav")):
        parts = wav.stem.split("_")
        if len(parts) != 4:
            result.errors.append({"id": wav.stem, "audio": f"AudioWAV/{wav.name}", "corpus": "crema_d",
                                  "reason": "file name is not <actor>_<sentence>_<emotion>_<level>"})
            continue
        actor, sentence, emotion_code, level = parts
        intended = normalize_emotion(emotion_code, "crema_d")
        clip_votes = votes.get(wav.stem) or [Vote(rater="intended", emotion=intended)]
        gender = genders.get(actor)
        make_record(
            result, root, id=wav.stem, audio=f"AudioWAV/{wav.name}", corpus="crema_d", votes=clip_votes,
            split=speaker_split(actor, validation, test, salt="crema_d"), speaker=actor,
            gender=gender if gender in ("female", "male") else None, transcript=SENTENCES.get(sentence),
            meta={"intended_emotion": intended, "intensity": LEVELS.get(level, level), "sentence": sentence},
        )
    return result
