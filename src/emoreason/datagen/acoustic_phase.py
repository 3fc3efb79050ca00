"""The acoustic pass of a run: every clip of the corpus measured (acoustic.py) in small shards, then the calibration
that turns the measurements into words, fitted on the training split or reused.

Clips that cannot be described are errors with the reason, never measurements: unreadable, empty, truncated, longer
than ``acoustic.max_seconds`` (default the encoder window, 30 s: the model hears no more), or without speech
(``acoustic.min_voiced_seconds`` of voiced frames and a peak above ``acoustic.silence_floor_dbfs``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.audio import TARGET_SAMPLE_RATE, AudioError, duration_of, load_audio, silent_or_too_short
from ..data.schema import EmotionRecord, RecordError
from .acoustic import Calibration, analyze, no_speech_reason
from .config import AcousticConfig, DatagenConfig
from .faults import KillHook
from .run_files import atomic_jsonl, fixed_plan, progress_bar, read_jsonl, split_into_shards


@dataclass(frozen=True)
class AnalysisLimits:
    fmin: float
    fmax: float
    max_seconds: float | None
    min_voiced_seconds: float
    silence_floor_dbfs: float

    @classmethod
    def from_config(cls, acoustic: AcousticConfig) -> AnalysisLimits:
        return cls(acoustic.fmin, acoustic.fmax, acoustic.max_seconds, acoustic.min_voiced_seconds,
                   acoustic.silence_floor_dbfs)


def _too_long(seconds: float, limits: AnalysisLimits) -> str | None:
    if limits.max_seconds is not None and seconds > limits.max_seconds:
        return (f"too long: the clip is {seconds:.1f} s, above acoustic.max_seconds={limits.max_seconds:g} "
                "(the model hears only the encoder window; cut the clip into segments or raise the limit)")
    return None


def analyze_clip(record: EmotionRecord, root: str, limits: AnalysisLimits) -> dict:
    """``{"id", "features"}`` for a clip that can be described, else ``{"id", "audio", "corpus", "reason"}``."""
    def error(reason: str) -> dict:
        return {"id": record.id, "audio": record.audio, "corpus": record.corpus, "reason": reason}

    try:
        path = record.audio_path(root)
        long_reason = _too_long(duration_of(path), limits)  # from the header: a long file is not decoded
        if long_reason:
            return error(f"bad audio {record.audio}: {long_reason}")
        waveform = load_audio(path)
        long_reason = _too_long(len(waveform) / TARGET_SAMPLE_RATE, limits)
        if long_reason:
            return error(f"bad audio {record.audio}: {long_reason}")
        refused = silent_or_too_short(waveform, TARGET_SAMPLE_RATE, silence_floor_dbfs=limits.silence_floor_dbfs)
        if refused:  # the rule the built-in server applies to the clips it is sent
            return error(f"bad audio {record.audio}: {refused}")
        features = analyze(waveform, TARGET_SAMPLE_RATE, transcript=record.transcript, fmin=limits.fmin,
                           fmax=limits.fmax)
    except (AudioError, RecordError) as err:
        return error(str(err))
    values = features.to_dict()
    silent = no_speech_reason(values, limits.min_voiced_seconds, limits.silence_floor_dbfs)
    if silent:
        return error(f"bad audio {record.audio}: {silent}")
    return {"id": record.id, "features": values}


def analyze_shard(args: tuple) -> tuple[int, list[dict]]:
    """One acoustic job ``(index, records, root, limits, shard_dir)``: ``(index, rows)``, its shard file written."""
    index, records, root, limits, shard_dir = args
    final = shard_dir / f"{index:05d}.jsonl"
    if final.is_file():  # another datagen worker got there first (it writes the same rows)
        return index, read_jsonl(final)
    hook = KillHook("acoustic")
    rows = []
    for record in records:
        rows.append(analyze_clip(record, root, limits))
        hook.tick()
    atomic_jsonl(final, rows)
    return index, rows


def acoustic_order(num_shards: int, num_workers: int, worker_index: int) -> list[int]:
    """This worker's share first, then everyone else's from the far end (taken over only if still missing then)."""
    mine = [i for i in range(num_shards) if i % num_workers == worker_index]
    return mine + [i for i in reversed(range(num_shards)) if i % num_workers != worker_index]


def analyze_corpus(records: list[EmotionRecord], root: Path, out: Path, cfg: DatagenConfig,
                   executor) -> dict[str, dict]:
    """Every clip's row (features or the reason it has none), by id: the shards already on disk read back, the
    missing ones computed on ``executor`` (its ``analyze`` method)."""
    by_id = {r.id: r for r in records}
    shards = fixed_plan(out, "acoustic", split_into_shards([r.id for r in records], cfg.acoustic.shard_size))
    shard_dir = out / "acoustic"
    shard_dir.mkdir(parents=True, exist_ok=True)
    limits = AnalysisLimits.from_config(cfg.acoustic)
    results: dict[str, dict] = {}
    todo = []
    for index in acoustic_order(len(shards), cfg.num_workers, cfg.worker_index):
        path = shard_dir / f"{index:05d}.jsonl"
        if path.is_file():
            for row in read_jsonl(path):
                results[row["id"]] = row
        else:
            todo.append((index, [by_id[i] for i in shards[index]], str(root), limits, shard_dir))
    bar = progress_bar(len(records), len(results), "acoustic", cfg.progress)
    for _, rows in executor.analyze(todo, cfg):
        results.update({row["id"]: row for row in rows})
        bar.update(len(rows))
    bar.close()
    return results


def calibration_for(records: list[EmotionRecord], acoustic: dict[str, dict], out: Path,
                    cfg: DatagenConfig) -> Calibration:
    """The run's calibration (saved as calibration.json): ``acoustic.calibration`` when given, the one a resumed run
    saved, else fitted on the ``acoustic.calibration_split`` clips with features."""
    path = out / "calibration.json"
    if cfg.acoustic.calibration:
        calibration = Calibration.load(cfg.acoustic.calibration)
        calibration.save(path)
    elif path.is_file():
        calibration = Calibration.load(path)
    else:
        split = cfg.acoustic.calibration_split
        calibration = Calibration.fit(((r.corpus, r.gender, acoustic[r.id]["features"]) for r in records
                                       if r.split == split and "features" in acoustic.get(r.id, {})), split=split)
        calibration.save(path)
    return calibration
