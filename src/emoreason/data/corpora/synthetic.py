"""The espeak-ng corpus made by ``emoreason synth-corpus`` (a ``records.jsonl`` manifest at the data root)."""

from __future__ import annotations

from pathlib import Path

from ..schema import iter_records
from . import CorpusError, CorpusLoad


def load(root: Path, manifest: str = "records.jsonl") -> CorpusLoad:
    path = Path(manifest) if Path(manifest).is_absolute() else root / manifest
    if not path.is_file():
        raise CorpusError(f"synthetic corpus manifest {path} not found (make it with `emoreason synth-corpus DIR`)")
    result = CorpusLoad()
    for record in iter_records(path):
        try:
            audio = record.audio_path(root)
        except ValueError as err:
            result.errors.append({"id": record.id, "audio": record.audio, "corpus": record.corpus, "reason": str(err)})
            continue
        if not audio.is_file():
            result.errors.append({"id": record.id, "audio": record.audio, "corpus": record.corpus,
                                  "reason": f"bad audio {audio}: file not found"})
            continue
        result.records.append(record)
    return result
