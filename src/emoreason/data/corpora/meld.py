"""MELD: ``{train,dev,test}_sent_emo.csv`` (Sr No., Utterance, Speaker, Emotion, Sentiment, Dialogue_ID,
Utterance_ID, Season, Episode, StartTime, EndTime) and one video per utterance, ``dia<D>_utt<U>.mp4``, in
``train_splits/``, ``dev_splits_complete/`` and ``output_repeated_splits_test/``.

Audio is extracted from the videos once (ffmpeg, 16 kHz mono) to ``audio/<split>/dia<D>_utt<U>.wav`` under the
corpus root; pre-extracted files there are used as they are. Earlier utterances of the same dialogue become the
record's ``context`` (``Speaker: text``). MELD has one label per utterance (a single vote) and no gender.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

from ..labels import normalize_emotion
from ..schema import Vote
from . import CorpusError, CorpusLoad, make_record, read_text

SPLITS = {
    "train": ("train_sent_emo.csv", "train_splits"),
    "validation": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}


def extract_audio(video: Path, wav: Path) -> None:
    """ffmpeg -> 16 kHz mono PCM; raises RuntimeError with ffmpeg's message."""
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is not installed (needed to extract MELD audio from the videos)")
    wav.parent.mkdir(parents=True, exist_ok=True)
    tmp = wav.with_name(wav.stem + ".part.wav")
    proc = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-vn", "-ac", "1",
                           "-ar", "16000", str(tmp)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed: {proc.stderr.strip()[-300:]}")
    tmp.replace(wav)


def load(root: Path, context_turns: int = 3, extract: bool = True) -> CorpusLoad:
    result = CorpusLoad()
    found = False
    for split, (csv_name, video_dir) in SPLITS.items():
        csv_path = root / csv_name
        if not csv_path.is_file():
            continue
        found = True
        rows = list(csv.DictReader(io.StringIO(read_text(csv_path))))
        rows.sort(key=lambda r: (int(r["Dialogue_ID"]), int(r["Utterance_ID"])))
        history: dict[int, list[str]] = {}
        for row in rows:
            dialogue, utterance = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            name = f"dia{dialogue}_utt{utterance}"
            rel = f"audio/{split}/{name}.wav"
            record_id = f"meld_{split}_{name}"
            wav = root / rel
            video = root / video_dir / f"{name}.mp4"
            if not wav.is_file() and extract and video.is_file():
                try:
                    extract_audio(video, wav)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    result.errors.append({"id": record_id, "audio": f"{video_dir}/{name}.mp4", "corpus": "meld",
                                          "reason": str(err)})
                    continue
            text = row["Utterance"].strip()
            turns = history.setdefault(dialogue, [])
            emotion = normalize_emotion(row["Emotion"], "meld")
            make_record(
                result, root, id=record_id, audio=rel, corpus="meld", votes=[Vote(rater="meld", emotion=emotion)],
                split=split, speaker=row.get("Speaker"), transcript=text,
                context=turns[-context_turns:] if context_turns else [],
                meta={"dialogue_id": dialogue, "utterance_id": utterance, "sentiment": row.get("Sentiment"),
                      "season": row.get("Season"), "episode": row.get("Episode")},
            )
            turns.append(f"{row.get('Speaker', '?')}: {text}")
    if not found:
        raise CorpusError(f"MELD: none of {[v[0] for v in SPLITS.values()]} found under {root}")
    return result
