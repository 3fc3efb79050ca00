"""A generic manifest: CSV or JSONL, one clip per row, for corpora without an adapter of their own.

JSONL rows that are complete records (``id, audio, duration, corpus``...) are read as records. Other rows are mapped
through ``columns`` (our field -> the file's column): ``audio`` is required; ``id`` defaults to the audio stem;
``votes`` is a list or a ``;``-separated string of emotions (one per rater), else ``label`` is the single vote;
``transcript``, ``speaker``, ``gender``, ``split`` and ``duration`` are optional (duration is read from the file
header when absent). Emotions are normalised into the common taxonomy (synonyms accepted); an unknown one is an
error naming the row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..labels import LabelError, normalize_emotion
from ..schema import EmotionRecord, RecordError, Vote
from . import CorpusError, CorpusLoad, make_record, read_text, speaker_split

DEFAULT_COLUMNS = {"id": "id", "audio": "audio", "label": "label", "votes": "votes", "transcript": "transcript",
                   "speaker": "speaker", "gender": "gender", "split": "split", "duration": "duration"}


def _rows(path: Path) -> list[tuple[str, dict]]:
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path.name}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise RecordError(f"invalid JSON ({err.msg})", record=f"{path.name}:{lineno}") from None
        return rows
    if path.suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(read_text(path)), delimiter="\t" if path.suffix == ".tsv" else ",")
        return [(f"{path.name}:{i + 2}", row) for i, row in enumerate(reader)]
    raise CorpusError(f"manifest {path} must be .jsonl, .csv or .tsv")


def load(root: Path, manifest: str = "manifest.csv", columns: dict | None = None, corpus: str = "manifest",
         vote_separator: str = ";") -> CorpusLoad:
    manifest = Path(manifest) if Path(manifest).is_absolute() else root / manifest
    if not manifest.is_file():
        raise CorpusError(f"manifest {manifest} not found")
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    result = CorpusLoad()
    for where, row in _rows(manifest):
        if all(k in row for k in ("id", "audio", "duration", "corpus")) and "votes" in row and isinstance(
                row.get("votes"), list) and all(isinstance(v, dict) for v in row["votes"]):
            record = EmotionRecord.from_dict(row, where=where)
            make_record(result, root, id=record.id, audio=record.audio, corpus=record.corpus, votes=record.votes,
                        label=record.label, duration=record.duration,
                        **{k: getattr(record, k) for k in ("split", "speaker", "gender", "transcript", "valence",
                                                            "arousal", "dominance", "context", "meta")})
            continue

        def value(key):
            raw = row.get(cols[key])
            return raw.strip() if isinstance(raw, str) else raw

        audio = value("audio")
        if not audio:
            raise RecordError("is required", record=where, field_name=cols["audio"])
        raw_votes = value("votes")
        if isinstance(raw_votes, str):
            raw_votes = [v.strip() for v in raw_votes.split(vote_separator) if v.strip()]
        try:
            emotions = [normalize_emotion(v) for v in (raw_votes or [])]
            label = normalize_emotion(value("label")) if value("label") else None
        except LabelError as err:
            raise RecordError(str(err), record=where, field_name="votes/label") from None
        votes = [Vote(rater=f"rater_{i}", emotion=e) for i, e in enumerate(emotions)] or (
            [Vote(rater="label", emotion=label)] if label else [])
        speaker = value("speaker") or None
        gender = (value("gender") or "").lower() or None
        gender = {"f": "female", "m": "male"}.get(gender, gender)
        duration = value("duration")
        make_record(
            result, root, id=str(value("id") or Path(audio).stem), audio=audio, corpus=corpus, votes=votes,
            label=label if not emotions else None, duration=float(duration) if duration not in (None, "") else None,
            split=value("split") or (speaker_split(speaker) if speaker else "train"), speaker=speaker,
            gender=gender if gender in ("female", "male") else None, transcript=value("transcript") or None,
        )
    return result
