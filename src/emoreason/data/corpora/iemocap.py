"""IEMOCAP: ``Session{1..5}/dialog/EmoEvaluation/*.txt`` with every evaluator's categorical and dimensional ratings.

An evaluation block looks like::

    [6.2901 - 8.2357]	Ses01F_impro01_F000	neu	[2.5000, 2.5000, 2.5000]
    C-E2:	Neutral state;	()
    C-E3:	Neutral state; Frustration;	()
    A-E3:	val 3; act 2; dom  2;	()

``C-`` lines are categorical (first category primary, the rest secondary), ``A-`` lines dimensional (1-5 scales),
matched into one vote per rater. Audio: ``Session*/sentences/wav/<dialog>/<turn>.wav``; transcripts:
``Session*/dialog/transcriptions/<dialog>.txt``. The speaker is session + the turn's gender letter; earlier turns of
the same dialogue become the record's ``context``. Split: by session (default: session 5 test, 4 validation).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..labels import LabelError, normalize_emotion
from ..schema import Vote
from . import CorpusLoad, make_record, read_text

HEADER_RE = re.compile(r"^\[(\d+\.?\d*)\s*-\s*(\d+\.?\d*)\]\s+(\S+)\s+(\S+)\s+\[([\d.]+),\s*([\d.]+),\s*([\d.]+)\]")
CATEGORICAL_RE = re.compile(r"^C-([^:]+):\s*(.*?)\s*\(")
DIMENSIONAL_RE = re.compile(r"^A-([^:]+):\s*val\s*(\d+(?:\.\d+)?);\s*act\s*(\d+(?:\.\d+)?);\s*dom\s*(\d+(?:\.\d+)?)")
TRANSCRIPT_RE = re.compile(r"^(\S+)\s+\[[\d.]+-[\d.]+\]:\s*(.*)$")


def _emotion(word: str) -> str | None:
    try:
        return normalize_emotion(word, "iemocap")
    except LabelError:
        return "other"


def _transcripts(session: Path, dialog: str) -> dict[str, str]:
    path = session / "dialog" / "transcriptions" / f"{dialog}.txt"
    if not path.is_file():
        return {}
    turns = {}
    for line in read_text(path).splitlines():
        match = TRANSCRIPT_RE.match(line.strip())
        if match:
            turns[match.group(1)] = match.group(2).strip()
    return turns


def load(root: Path, test_sessions=(5,), validation_sessions=(4,), context_turns: int = 3,
         include_self_ratings: bool = False) -> CorpusLoad:
    load_result = CorpusLoad()
    sessions = sorted(p for p in root.glob("Session*") if p.is_dir())
    for session in sessions:
        number = int(re.sub(r"\D", "", session.name) or 0)
        split = "test" if number in test_sessions else "validation" if number in validation_sessions else "train"
        for eval_file in sorted((session / "dialog" / "EmoEvaluation").glob("*.txt")):
            dialog = eval_file.stem
            transcripts = _transcripts(session, dialog)
            blocks = _blocks(read_text(eval_file))
            blocks.sort(key=lambda b: b["start"])
            history: list[str] = []
            for block in blocks:
                turn = block["turn"]
                gender_letter = turn.split("_")[-1][:1]
                text = transcripts.get(turn)
                votes = []
                for rater, (emotions, dims) in block["raters"].items():
                    if not include_self_ratings and not rater.startswith("E"):
                        continue
                    primary = emotions[0] if emotions else None
                    votes.append(Vote(rater=rater, emotion=primary, secondary=[e for e in emotions[1:] if e],
                                      valence=dims[0] if dims else None, arousal=dims[1] if dims else None,
                                      dominance=dims[2] if dims else None))
                valence, arousal, dominance = block["vad"]
                make_record(
                    load_result, root, id=turn, corpus="iemocap",
                    audio=f"{session.name}/sentences/wav/{dialog}/{turn}.wav",
                    votes=votes, label=_emotion(block["label"]) if block["label"] != "xxx" else None,
                    duration=block["end"] - block["start"] if block["end"] > block["start"] else None,
                    split=split, speaker=f"{turn[:5]}{gender_letter}",
                    gender={"F": "female", "M": "male"}.get(gender_letter), transcript=text,
                    valence=valence, arousal=arousal, dominance=dominance,
                    context=history[-context_turns:] if context_turns else [],
                    meta={"dialog": dialog, "start": block["start"], "end": block["end"],
                          "improvised": "impro" in dialog},
                )
                if text:
                    history.append(f"{gender_letter}: {text}")
    return load_result


def _blocks(text: str) -> list[dict]:
    blocks: list[dict] = []
    current = None
    for line in text.splitlines():
        line = line.strip()
        header = HEADER_RE.match(line)
        if header:
            start, end, turn, label, v, a, d = header.groups()
            current = {"start": float(start), "end": float(end), "turn": turn, "label": label.lower(),
                       "vad": (float(v), float(a), float(d)), "raters": {}}
            blocks.append(current)
            continue
        if current is None:
            continue
        cat = CATEGORICAL_RE.match(line)
        if cat:
            rater = cat.group(1).strip()
            words = [w.strip() for w in cat.group(2).split(";") if w.strip()]
            emotions = [_emotion(w) for w in words]
            entry = current["raters"].setdefault(rater, [[], None])
            entry[0] = [e for e in emotions if e]
            continue
        dim = DIMENSIONAL_RE.match(line)
        if dim:
            rater = dim.group(1).strip()
            entry = current["raters"].setdefault(rater, [[], None])
            entry[1] = tuple(float(x) for x in dim.group(2, 3, 4))
    return blocks
