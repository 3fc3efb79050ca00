"""MSP-Podcast: ``Labels/labels_consensus.csv`` plus the per-annotator ``Labels/labels_detailed.csv``.

Consensus columns: ``FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, Gender, Split_Set`` (EmoClass a letter:
N H S A F D U C O X). Detailed columns: the file name, the annotator (``WorkerID``/``Worker``), the primary emotion
(``EmoClass``, a word such as ``Angry``), secondary emotions (``EmoClass_Second``, comma-separated) and the
annotator's own ``EmoAct/EmoVal/EmoDom``. Column names are matched case-insensitively among the spellings releases
have used. Audio: ``Audios/<FileName>``; transcripts: ``Transcripts/<stem>.txt`` when present.
Split_Set: Train -> train, Development -> validation, Test1/Test2/Test3 -> test.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..labels import LabelError, normalize_emotion
from ..schema import Vote
from . import CorpusError, CorpusLoad, make_record, read_text

SPLITS = {"train": "train", "development": "validation", "dev": "validation", "validation": "validation"}
COLUMNS = {
    "file": ("filename", "file_name", "file"),
    "worker": ("workerid", "worker", "annotator", "worker_id"),
    "primary": ("emoclass", "emoclass_major", "primaryemotion", "emotion"),
    "secondary": ("emoclass_second", "secondaryemotions", "secondary", "emoclass_secondary"),
    "act": ("emoact", "arousal"),
    "val": ("emoval", "valence"),
    "dom": ("emodom", "dominance"),
    "speaker": ("spkrid", "speakerid", "speaker"),
    "gender": ("gender",),
    "split": ("split_set", "split"),
}


def _rows(path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(read_text(path)))
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]


def _get(row: dict, key: str) -> str | None:
    for name in COLUMNS[key]:
        if row.get(name):
            return row[name]
    return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _emotion(word: str | None) -> str | None:
    if not word:
        return None
    try:
        return normalize_emotion(word, "msp_podcast")
    except LabelError:
        return "other"


def load(root: Path, context_turns: int = 0) -> CorpusLoad:
    consensus_path = root / "Labels" / "labels_consensus.csv"
    if not consensus_path.is_file():
        raise CorpusError(f"MSP-Podcast: {consensus_path} not found")
    votes_by_file: dict[str, list[Vote]] = {}
    detailed_path = root / "Labels" / "labels_detailed.csv"
    if detailed_path.is_file():
        for i, row in enumerate(_rows(detailed_path)):
            name = _get(row, "file")
            if not name:
                continue
            secondary = [_emotion(w.strip()) for w in (_get(row, "secondary") or "").split(",") if w.strip()]
            votes_by_file.setdefault(name, []).append(Vote(
                rater=_get(row, "worker") or f"annotator_{i}", emotion=_emotion(_get(row, "primary")),
                secondary=[s for s in secondary if s], arousal=_float(_get(row, "act")),
                valence=_float(_get(row, "val")), dominance=_float(_get(row, "dom"))))
    result = CorpusLoad()
    for row in _rows(consensus_path):
        name = _get(row, "file")
        if not name:
            continue
        stem = Path(name).stem
        transcript_path = root / "Transcripts" / f"{stem}.txt"
        split_raw = (_get(row, "split") or "train").lower()
        gender = (_get(row, "gender") or "").lower()
        make_record(
            result, root, id=stem, audio=f"Audios/{name}", corpus="msp_podcast",
            votes=votes_by_file.get(name, []), label=_emotion(_get(row, "primary")),
            split=SPLITS.get(split_raw, "test" if split_raw.startswith("test") else "train"),
            speaker=_get(row, "speaker"), gender=gender if gender in ("female", "male") else None,
            transcript=read_text(transcript_path).strip() if transcript_path.is_file() else None,
            arousal=_float(_get(row, "act")), valence=_float(_get(row, "val")), dominance=_float(_get(row, "dom")),
            meta={"split_set": _get(row, "split")},
        )
    return result
