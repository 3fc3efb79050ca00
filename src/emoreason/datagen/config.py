"""The settings of a datagen run (the YAML under data_gen/configs/, ``--set`` overrides) and their validation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .acoustic import MIN_VOICED_SECONDS, SILENCE_FLOOR_DBFS
from .filters import FilterConfig
from .pairs import PAIR_KINDS
from .ray_config import RayConfig
from .teachers import TeacherConfig


@dataclass
class CorpusConfig:
    name: str = "synthetic"
    root: str = "."  # the data root; audio paths in records are relative to it
    options: dict = field(default_factory=dict)  # adapter keyword arguments (e.g. manifest, test_sessions)


@dataclass
class AcousticConfig:
    fmin: float = 60.0
    fmax: float = 500.0
    calibration: str | None = None  # reuse a saved calibration.json (e.g. the train run's) instead of fitting
    calibration_split: str = "train"
    workers: int = 1  # processes for the analysis
    shard_size: int = 64  # clips per acoustic shard (the unit of resume)
    max_seconds: float | None = 30.0  # longer clips are errors (the encoder window: the model hears no more)
    min_voiced_seconds: float = MIN_VOICED_SECONDS  # less voiced time than this: "no speech"
    silence_floor_dbfs: float = SILENCE_FLOOR_DBFS  # a loudest frame below this: "no speech"


@dataclass
class PromptConfig:
    template: str = "data_gen/prompts/rationale.txt"
    spurious_template: str = "data_gen/prompts/spurious.txt"
    instructions: str = "data_gen/instructions/emotion_reasoning.txt"
    with_distribution: bool = True  # ask for (and keep) a <distribution> over emotions


@dataclass
class PairsConfig:
    enabled: bool = True
    kinds: list[str] = field(default_factory=lambda: list(PAIR_KINDS))


@dataclass
class DatagenConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    output_dir: str = "runs/datagen"
    task: str = "emotion_reasoning"
    seed: int = 0
    shard_size: int = 512  # records per generation shard: one teacher call each (fills vLLM's batches)
    limit: int | None = None  # generate for a deterministic subset of this many clips (all clips get cues)
    # Where the passes run: "local" (this process, a process pool for the acoustic pass) or "ray" (Ray Data over a
    # cluster: datagen/ray_executor.py, settings under ``ray``). Both write the same shards and the same outputs.
    executor: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)
    # Without Ray: processes/GPUs/nodes started by hand share one run; each generates shards i % num_workers == index
    num_workers: int = 1
    worker_index: int = 0
    splits: list[str] | None = None  # generate for these splits only (default: all)
    acoustic: AcousticConfig = field(default_factory=AcousticConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup_scope: str = "record"  # "record": no two kept samples of a clip alike; "run": none in the whole run
    pairs: PairsConfig = field(default_factory=PairsConfig)
    write_parquet: bool = True
    # On every (re)start, records of finished shards whose teacher request failed (a timeout, a 5xx, a lost pair
    # negative) are generated again and their shard rewritten; a transient outage loses nothing for good.
    retry_teacher_failures: bool = True
    progress: bool = True
    config_dir: str | None = None  # where the YAML was (relative prompt paths fall back to the repo around it)


class ConfigError(ValueError):
    """A config key or value that the data stage does not understand."""


def build_section(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        sub = NESTED.get((cls, name))
        values[name] = build_section(sub, value or {}, f"{where}.{name}".strip(".")) if sub else value
    return cls(**values)


NESTED = {(DatagenConfig, "corpus"): CorpusConfig, (DatagenConfig, "acoustic"): AcousticConfig,
          (DatagenConfig, "teacher"): TeacherConfig, (DatagenConfig, "prompt"): PromptConfig,
          (DatagenConfig, "filters"): FilterConfig, (DatagenConfig, "pairs"): PairsConfig,
          (DatagenConfig, "ray"): RayConfig}
EXECUTOR_NAMES = ("local", "ray")  # their classes: executors.EXECUTORS


def apply_override(data: dict, assignment: str) -> None:
    """``a.b.c=value`` (value parsed as YAML: numbers, booleans, lists) into nested dicts."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    target = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    target[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DatagenConfig:
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.setdefault("config_dir", str(Path(path).resolve().parent))
    for assignment in overrides or []:
        apply_override(data, assignment)
    cfg = build_section(DatagenConfig, data, "")
    if cfg.dedup_scope not in ("record", "run"):
        raise ConfigError(f"dedup_scope must be 'record' or 'run', got {cfg.dedup_scope!r}")
    if cfg.filters.answer_must_match not in ("votes", "consensus"):
        raise ConfigError("filters.answer_must_match must be votes or consensus, "
                          f"got {cfg.filters.answer_must_match!r}")
    if cfg.shard_size < 1 or cfg.acoustic.shard_size < 1:
        raise ConfigError("shard_size and acoustic.shard_size must be >= 1")
    if cfg.acoustic.max_seconds is not None and cfg.acoustic.max_seconds <= 0:
        raise ConfigError(f"acoustic.max_seconds must be positive (or null), got {cfg.acoustic.max_seconds}")
    if not 0 <= cfg.worker_index < cfg.num_workers:
        raise ConfigError(f"worker_index must be in [0, num_workers), got {cfg.worker_index} of {cfg.num_workers}")
    if cfg.num_workers > 1 and cfg.dedup_scope == "run":
        raise ConfigError("dedup_scope: run needs one worker (workers cannot see each other's kept rationales)")
    if cfg.executor not in EXECUTOR_NAMES:
        raise ConfigError(f"executor must be one of {list(EXECUTOR_NAMES)}, got {cfg.executor!r}")
    if cfg.executor != "local" and cfg.num_workers > 1:
        raise ConfigError(f"executor {cfg.executor} spreads the shards itself: leave num_workers at 1")
    if cfg.executor != "local" and cfg.dedup_scope == "run":
        raise ConfigError("dedup_scope: run needs the local executor (actors cannot see each other's rationales)")
    return cfg


def resolve_input(path: str, cfg: DatagenConfig) -> Path:
    """A user-edited input (prompt, pool): as given, else relative to the repo around the config file."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists() or not cfg.config_dir:
        return candidate
    config_dir = Path(cfg.config_dir)
    for base in (config_dir, *config_dir.parents[:3]):
        if (base / path).exists():
            return base / path
    return candidate
