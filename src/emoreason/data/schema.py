"""The one record type every stage reads and writes, with validation that names the record and the field.

A record is one clip (or one training example derived from a clip). Files are JSONL (one record per line) or
parquet (nested fields stored as JSON text, so both formats round-trip the same values).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .labels import EMOTIONS

SPLITS = ("train", "validation", "test")
GENDERS = ("female", "male")


class RecordError(ValueError):
    """A malformed record. The message names the record (id or file:line) and the field."""

    def __init__(self, message: str, *, record: str | None = None, field_name: str | None = None):
        self.record = record
        self.field_name = field_name
        where = f"record {record}" if record else "record"
        what = f", field '{field_name}'" if field_name else ""
        super().__init__(f"{where}{what}: {message}")


class UnsafePathError(RecordError):
    """An audio path that would leave the data root."""


@dataclass
class Vote:
    """One annotator's rating of a clip."""

    rater: str
    emotion: str | None  # in the common taxonomy; None = the rater gave no usable category
    secondary: list[str] = field(default_factory=list)
    valence: float | None = None
    arousal: float | None = None
    dominance: float | None = None


@dataclass
class EmotionRecord:
    id: str
    audio: str  # relative to the data root
    duration: float
    corpus: str
    split: str = "train"
    speaker: str | None = None
    gender: str | None = None
    transcript: str | None = None
    label: str | None = None  # consensus, common taxonomy
    votes: list[Vote] = field(default_factory=list)
    distribution: dict[str, float] = field(default_factory=dict)  # soft label over emotions
    valence: float | None = None
    arousal: float | None = None
    dominance: float | None = None
    cues: dict[str, Any] = field(default_factory=dict)  # measured acoustic cues and their words
    context: list[str] = field(default_factory=list)  # prior dialogue turns, oldest first
    task: str | None = None  # training task this example serves (e.g. "emotion_reasoning")
    instruction: str | None = None
    response: str | None = None  # rationale + answer, the training target
    meta: dict[str, Any] = field(default_factory=dict)  # provenance and corpus-specific extras

    # -- conversion -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> EmotionRecord:
        """Validate and build a record; raises :class:`RecordError` naming ``where`` (or the id) and the field."""
        if not isinstance(data, dict):
            raise RecordError(f"expected an object, got {type(data).__name__}", record=where)
        rid = data.get("id")
        name = where or (str(rid) if rid is not None else None)
        if where and rid is not None:
            name = f"{where} (id {rid})"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecordError(f"unknown field(s) {unknown}", record=name, field_name=unknown[0])
        for required in ("id", "audio", "duration", "corpus"):
            if data.get(required) in (None, ""):
                raise RecordError("is required", record=name, field_name=required)
        values = dict(data)
        values["id"] = _string(values["id"], name, "id")
        values["audio"] = _string(values["audio"], name, "audio")
        values["corpus"] = _string(values["corpus"], name, "corpus")
        values["duration"] = _number(values["duration"], name, "duration", minimum=0.0, strict=True)
        split = values.get("split", "train")
        if split not in SPLITS:
            raise RecordError(f"must be one of {SPLITS}, got {split!r}", record=name, field_name="split")
        gender = values.get("gender")
        if gender is not None and gender not in GENDERS:
            raise RecordError(f"must be one of {GENDERS} or null, got {gender!r}", record=name, field_name="gender")
        label = values.get("label")
        if label is not None and label not in EMOTIONS:
            raise RecordError(f"{label!r} is not in the taxonomy {EMOTIONS}", record=name, field_name="label")
        for opt in ("speaker", "transcript", "task", "instruction", "response"):
            if values.get(opt) is not None:
                values[opt] = _string(values[opt], name, opt)
        for dim in ("valence", "arousal", "dominance"):
            if values.get(dim) is not None:
                values[dim] = _number(values[dim], name, dim)
        values["votes"] = [_vote(v, name, i) for i, v in enumerate(values.get("votes") or [])]
        dist = values.get("distribution") or {}
        if not isinstance(dist, dict):
            raise RecordError("must be an object {emotion: share}", record=name, field_name="distribution")
        for emo, share in dist.items():
            if emo not in EMOTIONS:
                raise RecordError(f"{emo!r} is not in the taxonomy", record=name, field_name="distribution")
            _number(share, name, "distribution", minimum=0.0)
        if dist and abs(sum(dist.values()) - 1.0) > 1e-3 and sum(dist.values()) > 0:
            raise RecordError(f"shares sum to {sum(dist.values()):.4f}, not 1", record=name, field_name="distribution")
        values["distribution"] = {k: float(v) for k, v in dist.items()}
        for obj in ("cues", "meta"):
            if not isinstance(values.get(obj) or {}, dict):
                raise RecordError("must be an object", record=name, field_name=obj)
            values[obj] = dict(values.get(obj) or {})
        context = values.get("context") or []
        if not isinstance(context, list) or not all(isinstance(c, str) for c in context):
            raise RecordError("must be a list of strings", record=name, field_name="context")
        values["context"] = list(context)
        return cls(**values)

    # -- audio path safety ------------------------------------------------------------------------------------
    def audio_path(self, data_root: str | os.PathLike) -> Path:
        """Absolute audio path under ``data_root``; refuses absolute paths and ``..`` escapes (also via symlinks)."""
        return resolve_under_root(self.audio, data_root, record=self.id)


def resolve_under_root(relative: str, data_root: str | os.PathLike, record: str | None = None) -> Path:
    root = Path(data_root).resolve()
    candidate = Path(relative)
    if candidate.is_absolute():
        raise UnsafePathError(f"absolute path {relative!r} is not allowed; paths are relative to the data root",
                              record=record, field_name="audio")
    resolved = (root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafePathError(f"path {relative!r} escapes the data root {str(root)!r}", record=record,
                              field_name="audio")
    return resolved


def _string(value: Any, record: str | None, name: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise RecordError(f"must be a string, got {type(value).__name__}", record=record, field_name=name)
    return str(value)


def _number(value: Any, record: str | None, name: str, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"must be a number, got {value!r}", record=record, field_name=name)
    value = float(value)
    if not math.isfinite(value):
        raise RecordError(f"must be finite, got {value}", record=record, field_name=name)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise RecordError(f"must be {'>' if strict else '>='} {minimum}, got {value}", record=record, field_name=name)
    return value


def _vote(data: Any, record: str | None, index: int) -> Vote:
    fname = f"votes[{index}]"
    if isinstance(data, Vote):
        return data
    if not isinstance(data, dict) or "rater" not in data:
        raise RecordError("must be an object with 'rater' and 'emotion'", record=record, field_name=fname)
    emotion = data.get("emotion")
    if emotion is not None and emotion not in EMOTIONS:
        raise RecordError(f"{emotion!r} is not in the taxonomy", record=record, field_name=f"{fname}.emotion")
    secondary = data.get("secondary") or []
    for s in secondary:
        if s not in EMOTIONS:
            raise RecordError(f"{s!r} is not in the taxonomy", record=record, field_name=f"{fname}.secondary")
    dims = {d: (None if data.get(d) is None else _number(data[d], record, f"{fname}.{d}"))
            for d in ("valence", "arousal", "dominance")}
    extra = set(data) - {"rater", "emotion", "secondary", "valence", "arousal", "dominance"}
    if extra:
        raise RecordError(f"unknown key(s) {sorted(extra)}", record=record, field_name=fname)
    return Vote(rater=str(data["rater"]), emotion=emotion, secondary=list(secondary), **dims)


# -- files ----------------------------------------------------------------------------------------------------
_NESTED = ("votes", "distribution", "cues", "context", "meta")


def iter_records(path: str | os.PathLike) -> Iterator[EmotionRecord]:
    """Read records from ``.jsonl`` or ``.parquet``; a bad line raises :class:`RecordError` naming file:line."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            for key in _NESTED:
                if isinstance(row.get(key), str):
                    row[key] = json.loads(row[key])
            yield EmotionRecord.from_dict(row, where=f"{path.name}:{i + 1}")
        return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"invalid JSON ({err.msg})", record=f"{path.name}:{lineno}") from None
            yield EmotionRecord.from_dict(data, where=f"{path.name}:{lineno}")


def read_records(path: str | os.PathLike) -> list[EmotionRecord]:
    return list(iter_records(path))


def write_records(records: Iterable[EmotionRecord], path: str | os.PathLike) -> Path:
    """Write records as JSONL or parquet (by suffix), atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never collide
    rows = [r.to_dict() for r in records]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = [{k: (json.dumps(v) if k in _NESTED else v) for k, v in row.items()} for row in rows]
        schema = pa.schema([(f.name, _arrow_type(f.name)) for f in dataclasses.fields(EmotionRecord)])
        pq.write_table(pa.Table.from_pylist(flat, schema=schema), tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _arrow_type(name: str):
    import pyarrow as pa

    if name in ("duration", "valence", "arousal", "dominance"):
        return pa.float64()
    return pa.string()
