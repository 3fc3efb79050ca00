"""ESD (Emotional Speech Dataset): ``<speaker>/<Emotion>/[train|evaluation|test/]<speaker>_<nnnnnn>.wav`` and one
transcript file per speaker, ``<speaker>/<speaker>.txt`` (``<utt id>\\t<text>\\t<emotion>``; UTF-16 or UTF-8).

Speakers 0001-0010 speak Mandarin, 0011-0020 English. The release's train/evaluation/test sub-folders give the
split when present; otherwise utterance numbers within each emotion block (1-300 train, 301-320 validation, rest
test) follow the same convention. Gender comes from the ``genders`` option ({speaker: "female"|"male"}) since the
release documents it outside the tree. Acted emotion = the single vote.
"""

from __future__ import annotations

from pathlib import Path

from ..labels import normalize_emotion
from ..schema import Vote
from . import CorpusLoad, make_record, read_text

FOLDER_SPLITS = {"train": "train", "evaluation": "validation", "test": "test"}


def _split_from_number(number: int) -> str:
    within = (number - 1) % 350 + 1
    return "train" if within <= 300 else "validation" if within <= 320 else "test"


def load(root: Path, genders: dict | None = None, languages=("english", "mandarin")) -> CorpusLoad:
    genders = {str(k).zfill(4): v for k, v in (genders or {}).items()}
    result = CorpusLoad()
    for speaker_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        speaker = speaker_dir.name
        language = "mandarin" if int(speaker) <= 10 else "english"
        if language not in languages:
            continue
        texts = {}
        transcript_file = speaker_dir / f"{speaker}.txt"
        if transcript_file.is_file():
            for line in read_text(transcript_file).splitlines():
                parts = line.strip().split("\t")
                if len(parts) >= 2:
                    texts[parts[0].strip()] = parts[1].strip()
        for wav in sorted(speaker_dir.glob("*/**/*.wav")):
            rel_parts = wav.relative_to(speaker_dir).parts
            emotion = normalize_emotion(rel_parts[0], "esd")
            split = FOLDER_SPLITS.get(rel_parts[1]) if len(rel_parts) > 2 else None
            number = int(wav.stem.split("_")[-1]) if wav.stem.split("_")[-1].isdigit() else 0
            make_record(
                result, root, id=f"esd_{wav.stem}", audio=wav.relative_to(root).as_posix(), corpus="esd",
                votes=[Vote(rater="acted", emotion=emotion)], split=split or _split_from_number(number),
                speaker=speaker, gender=genders.get(speaker), transcript=texts.get(wav.stem),
                meta={"language": language},
            )
    return result
