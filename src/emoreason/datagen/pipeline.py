"""The data-generation run: corpus -> acoustic cues -> calibration -> teacher rationales -> filters -> pairs.

Runs are sharded and resumable. The plan (which record ids go into which shard) is fixed on the first start and
saved; each shard's outputs are written to a temporary folder renamed into place only when the shard is complete,
so a run killed at any moment and restarted redoes at most the shards in flight and ends with every input exactly
once (kept, dropped by the filters, or reported as bad audio). Several processes (GPUs, nodes) can share a run
(``num_workers``, ``worker_index``): each analyses and generates its share of the shards (a worker that finishes
its acoustic share early goes on with the shards still missing, from the far end, so a lone worker completes the
run), and the one that completes the last shard merges. Generation shards are large (``shard_size``, 512 prompts x
``num_samples``), enough to fill a vLLM engine's batches; acoustic shards are small (``acoustic.shard_size``).

Clips that cannot be described go to errors.jsonl with the reason, never into records or the calibration: unreadable,
empty, truncated, longer than ``acoustic.max_seconds`` (default the encoder window, 30 s: the model hears no more), or
without speech (``acoustic.min_voiced_seconds`` of voiced frames and a peak above ``acoustic.silence_floor_dbfs``). A
teacher request that still fails after the client's retries drops that clip (rejected.jsonl, reason
``teacher_error``, counted in the summary) and the run goes on; an endpoint that cannot be reached at all stops the
run, which resumes where it stopped.

Outputs under ``output_dir``:

    records.jsonl / records.parquet   kept EmotionRecords (task, instruction, response, cues, meta.provenance)
    pairs.jsonl / pairs.parquet       DPO pairs: response = chosen, meta["rejected"] = [{text, kind, detail}]
    rejected.jsonl                    one line per rejected sample: id, sample, reason, detail, text, outcome
    errors.jsonl                      bad audio / unreadable clips with the reason
    calibration.json                  tertile edges fitted on the training split (reused for every split)
    cooccurrence.json                 emotion co-occurrence of the training split's votes
    summary.json                      counts: kept, dropped, bad audio, rejections by reason, pairs by kind
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..data.audio import TARGET_SAMPLE_RATE, AudioError, duration_of, load_audio, silent_or_too_short
from ..data.corpora import CorpusError, load_corpus
from ..data.labels import cooccurrence_matrix, entropy, multi_label
from ..data.schema import EmotionRecord, RecordError, read_records, write_records
from .acoustic import MIN_VOICED_SECONDS, SILENCE_FLOOR_DBFS, Calibration, analyze, no_speech_reason
from .filters import FilterConfig, run_filters, think_hash
from .pairs import PAIR_KINDS, accept_rejected, pair_requests
from .ray_config import RayConfig
from .seed import PromptTemplate, SeedDescription, answer_format, load_pool, pick
from .teachers import TeacherConfig, TeacherFailure, TeacherRequest, get_teacher

logger = logging.getLogger(__name__)
KILL_HOOK_ENV = "EMOREASON_DATAGEN_KILL_AFTER"  # "<phase>:<n>" (phase acoustic|generate): SIGKILL, for tests


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


# -- config ----------------------------------------------------------------------------------------------------
def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        sub = NESTED.get((cls, name))
        values[name] = _build(sub, value or {}, f"{where}.{name}".strip(".")) if sub else value
    return cls(**values)


NESTED = {(DatagenConfig, "corpus"): CorpusConfig, (DatagenConfig, "acoustic"): AcousticConfig,
          (DatagenConfig, "teacher"): TeacherConfig, (DatagenConfig, "prompt"): PromptConfig,
          (DatagenConfig, "filters"): FilterConfig, (DatagenConfig, "pairs"): PairsConfig,
          (DatagenConfig, "ray"): RayConfig}
EXECUTORS = ("local", "ray")  # the classes: datagen/executors.py


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
    cfg = _build(DatagenConfig, data, "")
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
    if cfg.executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {list(EXECUTORS)}, got {cfg.executor!r}")
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


# -- small file helpers ----------------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _tmp(path: Path) -> Path:
    # Per process: workers sharing a run may write the same (identical) file at the same moment.
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _atomic_json(path: Path, data) -> None:
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def _atomic_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = _tmp(path)
    _write_jsonl(tmp, rows)
    os.replace(tmp, path)


class _KillHook:
    """Test hook: SIGKILL this process after N items of a phase (simulates a crash at an arbitrary point)."""

    counts: dict[str, int] = {}  # per phase, for the whole process

    def __init__(self, phase: str):
        spec = os.environ.get(KILL_HOOK_ENV, "")
        hook_phase, _, count = spec.partition(":")
        self.phase = phase
        self.limit = int(count) if spec and hook_phase == phase and count.isdigit() else None

    def tick(self) -> None:
        if self.limit is None:
            return
        self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
        if self.counts[self.phase] >= self.limit:
            os.kill(os.getpid(), signal.SIGKILL)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="clip", disable=not enabled, dynamic_ncols=True)


def _shards(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i: i + size] for i in range(0, len(ids), size)]


def _plan(out: Path, name: str, shards: list[list[str]]) -> list[list[str]]:
    """Fix the shard plan on the first start; a resumed run must see the same inputs in the same shards."""
    path = out / f"plan_{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != shards:
            raise ConfigError(
                f"{out} holds a run with a different {name} plan (inputs, limit, splits or shard_size changed); "
                "resume with the same settings, or use a new output_dir")
        return saved
    _atomic_json(path, shards)
    return shards


# -- phase A: acoustic analysis --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _AnalysisLimits:
    fmin: float
    fmax: float
    max_seconds: float | None
    min_voiced_seconds: float
    silence_floor_dbfs: float


def _too_long(seconds: float, limits: _AnalysisLimits) -> str | None:
    if limits.max_seconds is not None and seconds > limits.max_seconds:
        return (f"too long: the clip is {seconds:.1f} s, above acoustic.max_seconds={limits.max_seconds:g} "
                "(the model hears only the encoder window; cut the clip into segments or raise the limit)")
    return None


def _analyze_one(record: EmotionRecord, root: str, limits: _AnalysisLimits) -> dict:
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


def _analyze_shard(args) -> tuple[int, list[dict]]:
    index, records, root, limits, shard_dir = args
    final = shard_dir / f"{index:05d}.jsonl"
    if final.is_file():  # another datagen worker got there first (it writes the same rows)
        return index, _read_jsonl(final)
    hook = _KillHook("acoustic")
    rows = []
    for record in records:
        rows.append(_analyze_one(record, root, limits))
        hook.tick()
    tmp = _tmp(final)
    _write_jsonl(tmp, rows)
    os.replace(tmp, final)
    return index, rows


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Pool initializer: this worker dies with the process that started it (a killed datagen run must not leave
    workers writing shards). Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG); everywhere:
    a daemon thread also watches the parent pid."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent, initargs=(os.getpid(),))


def acoustic_order(num_shards: int, num_workers: int, worker_index: int) -> list[int]:
    """This worker's share first, then everyone else's from the far end (taken over only if still missing then)."""
    mine = [i for i in range(num_shards) if i % num_workers == worker_index]
    return mine + [i for i in reversed(range(num_shards)) if i % num_workers != worker_index]


class LocalExecutor:
    """Runs both passes on this machine: acoustic shards in a process pool of ``acoustic.workers``, generation shards
    one after the other in this process. The Ray executor (ray_executor.py) has the same two methods."""

    def analyze(self, jobs: list[tuple], cfg: DatagenConfig):
        """``(index, rows)`` for each acoustic job (``_analyze_shard``'s arguments), its shard file written."""
        if cfg.acoustic.workers > 1 and len(jobs) > 1:
            with worker_pool(cfg.acoustic.workers) as pool:
                yield from pool.map(_analyze_shard, jobs)
        else:
            for job in jobs:
                yield _analyze_shard(job)

    def generate(self, generator: Generator, jobs: list[tuple[int, list[EmotionRecord]]]):
        """``(index, outputs)`` for each ``(shard index, records)``, in order (``dedup_scope: run`` needs it)."""
        for index, records in jobs:
            yield index, generator.shard(records)


def analyze_corpus(records: list[EmotionRecord], root: Path, out: Path, cfg: DatagenConfig,
                   executor=None) -> dict[str, dict]:
    by_id = {r.id: r for r in records}
    shards = _plan(out, "acoustic", _shards([r.id for r in records], cfg.acoustic.shard_size))
    shard_dir = out / "acoustic"
    shard_dir.mkdir(parents=True, exist_ok=True)
    limits = _AnalysisLimits(cfg.acoustic.fmin, cfg.acoustic.fmax, cfg.acoustic.max_seconds,
                             cfg.acoustic.min_voiced_seconds, cfg.acoustic.silence_floor_dbfs)
    results: dict[str, dict] = {}
    todo = []
    for index in acoustic_order(len(shards), cfg.num_workers, cfg.worker_index):
        path = shard_dir / f"{index:05d}.jsonl"
        if path.is_file():
            for row in _read_jsonl(path):
                results[row["id"]] = row
        else:
            todo.append((index, [by_id[i] for i in shards[index]], str(root), limits, shard_dir))
    bar = _progress(len(records), len(results), "acoustic", cfg.progress)
    for _, rows in (executor or LocalExecutor()).analyze(todo, cfg):
        results.update({row["id"]: row for row in rows})
        bar.update(len(rows))
    bar.close()
    return results


# -- phase B: rationales, filters, pairs -----------------------------------------------------------------------
@dataclass
class Generator:
    cfg: DatagenConfig
    calibration: Calibration
    acoustic: dict[str, dict]
    teacher: Any
    label_space: list[str]
    seen: set = field(default_factory=set)

    def __post_init__(self):
        self.prompt = PromptTemplate.load(resolve_input(self.cfg.prompt.template, self.cfg))
        self.spurious_prompt = PromptTemplate.load(resolve_input(self.cfg.prompt.spurious_template, self.cfg))
        self.pool = load_pool(resolve_input(self.cfg.prompt.instructions, self.cfg))
        self.hook = _KillHook("generate")

    def provenance(self, sample: int) -> dict:
        return {"teacher": self.teacher.name, "model": self.teacher.model_id,
                "backend": getattr(self.teacher, "backend", None), "prompt_id": self.prompt.prompt_id,
                "seed": self.cfg.seed, "sample": sample, "emoreason": __version__}

    def soft_label(self, record: EmotionRecord) -> dict:
        """Ambiguity (entropy, bits) and the 1/C multi-label target over the corpus's label space."""
        return {"entropy": round(entropy(record.distribution), 4),
                "multi_label": multi_label(record.distribution, num_classes=len(self.label_space)),
                "num_classes": len(self.label_space)}

    def record_seed(self, record_id: str) -> int:
        return int(hashlib.sha1(f"{self.cfg.seed}:{record_id}".encode()).hexdigest()[:8], 16)

    def shard(self, records: list[EmotionRecord]) -> dict[str, list[dict]]:
        out = {"records": [], "rejected": [], "pairs": [], "errors": [], "dropped": [], "teacher_chats": []}
        prepared, requests = [], []
        for record in records:
            analysis = self.acoustic.get(record.id) or {"reason": "no acoustic analysis"}
            if "features" not in analysis:
                out["errors"].append({"id": record.id, "audio": record.audio, "reason": analysis["reason"]})
                self.hook.tick()
                continue
            cues = self.calibration.describe(analysis["features"], record.corpus, record.gender)
            sources = cues.pop("calibration")
            description = SeedDescription.from_record(record, cues)
            target = record.label or (description.annotators[0][0] if description.annotators else None)
            if target is None:
                dropped = {"id": record.id, "reason": "no_label", "detail": "no label and no votes"}
                out["dropped"].append(dropped)
                out["rejected"].append({**dropped, "sample": None, "text": None, "outcome": "dropped"})
                self.hook.tick()
                continue
            distribution = {k: v for k, v in record.distribution.items() if v > 0} if (
                self.cfg.prompt.with_distribution) else None
            instruction = pick(self.pool, record.id, self.cfg.seed)
            prompt = self.prompt.render(description=description.render(), instruction=instruction, target=target,
                                        format=answer_format(target, distribution or None))
            requests.append(TeacherRequest(record.id, prompt, self.cfg.teacher.num_samples,
                                           self.record_seed(record.id), description, target, distribution or None))
            prepared.append((record, cues, sources, description, target, instruction, prompt))

        samples = self.teacher.generate(requests)
        kept = []
        for (record, cues, sources, description, target, instruction, prompt), texts in zip(prepared, samples):
            if isinstance(texts, TeacherFailure):
                failed = {"id": record.id, "reason": "teacher_error", "detail": texts.reason}
                out["dropped"].append(failed)
                out["rejected"].append({**failed, "sample": None, "text": None, "outcome": "dropped"})
                self.hook.tick()
                continue
            local_seen = self.seen if self.cfg.dedup_scope == "run" else set()
            accepted, rejections = None, []
            for index, text in enumerate(texts):
                if accepted is not None:
                    break
                parsed, failure = run_filters(text, record, cues, self.cfg.filters, local_seen)
                if failure:
                    rejections.append({"id": record.id, "sample": index, "reason": failure[0], "detail": failure[1],
                                       "text": text})
                    continue
                accepted = (index, text)
                local_seen.add(think_hash(parsed.think or ""))
            outcome = "kept_other_sample" if accepted else "dropped"
            out["rejected"].extend({**r, "outcome": outcome} for r in rejections)
            if accepted is None:
                out["dropped"].append({"id": record.id, "reason": rejections[-1]["reason"] if rejections
                                       else "no_samples", "detail": f"{len(texts)} samples rejected"})
            else:
                index, text = accepted
                kept_record = dataclasses.replace(
                    record, cues=cues, task=self.cfg.task, instruction=instruction, response=text,
                    meta={**record.meta, "provenance": self.provenance(index), "cue_calibration": sources,
                          "samples": len(texts), "rejected_samples": len(rejections),
                          "soft_label": self.soft_label(record)})
                out["records"].append(kept_record.to_dict())
                out["teacher_chats"].append(teacher_chat(record, prompt, text))
                kept.append((kept_record, description, target, instruction))
            self.hook.tick()

        if self.cfg.pairs.enabled and kept:
            out["pairs"] = self.pairs(kept, out["rejected"])
        return out

    def pairs(self, kept, rejected: list[dict]) -> list[dict]:
        """DPO lines for the kept records; a negative whose teacher request failed is listed in ``rejected``."""
        jobs = []
        for record, description, target, instruction in kept:
            for job in pair_requests(record, description, target, instruction, self.prompt, self.spurious_prompt,
                                     self.label_space, self.cfg.pairs.kinds, self.record_seed(record.id)):
                jobs.append((record, job))
        texts = self.teacher.generate([job.request for _, job in jobs])
        rejected_by_record: dict[str, list[dict]] = {}
        failures: dict[str, list[dict]] = {}
        for (record, job), outputs in zip(jobs, texts):
            entry = {"text": None, "kind": job.kind, "detail": job.detail}
            if isinstance(outputs, TeacherFailure):
                failures.setdefault(record.id, []).append({**entry, "unusable": f"teacher_error: {outputs.reason}"})
                rejected.append({"id": record.id, "sample": None, "reason": "teacher_error", "detail": outputs.reason,
                                 "text": None, "outcome": f"no_{job.kind}_negative"})
                continue
            text = outputs[0] if outputs else ""
            problem = accept_rejected(job.kind, text, record.response or "", record, record.cues)
            entry["text"] = text
            if problem:
                failures.setdefault(record.id, []).append({**entry, "unusable": problem})
            else:
                rejected_by_record.setdefault(record.id, []).append(entry)
        lines = []
        for record, *_ in kept:
            if record.id in rejected_by_record:
                meta = {**record.meta, "rejected": rejected_by_record[record.id]}
                if record.id in failures:
                    meta["unusable_negatives"] = failures[record.id]
                lines.append(dataclasses.replace(record, meta=meta).to_dict())
        return lines


def teacher_chat(record: EmotionRecord, prompt: str, response: str) -> dict:
    """One line of ``teacher_chats.jsonl``: the teacher's prompt and its kept answer as a chat, with the record's id
    and split. It is what distilling a teacher takes (the demo warms its backbone up on the train split's lines)."""
    return {"id": record.id, "split": record.split,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def _select(records: list[EmotionRecord], cfg: DatagenConfig) -> list[EmotionRecord]:
    chosen = [r for r in records if not cfg.splits or r.split in cfg.splits]
    if cfg.limit is not None and cfg.limit < len(chosen):
        # A stable pseudo-random subset (spread over speakers and emotions), not the first N ids.
        chosen = sorted(chosen, key=lambda r: hashlib.sha1(f"{cfg.seed}:{r.id}".encode()).hexdigest())[: cfg.limit]
        chosen.sort(key=lambda r: r.id)
    return chosen


def run(cfg: DatagenConfig, executor=None) -> dict:
    """The run on ``executor`` (default :class:`LocalExecutor`; ``executors.run`` picks the one ``cfg.executor``
    names). Plan, shard files, resume, teacher-failure retries and the merge are the same for every executor."""
    if executor is None and cfg.executor != "local":
        raise ConfigError(f"executor {cfg.executor}: start the run with emoreason.datagen.executors.run")
    executor = executor or LocalExecutor()
    start = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    root = Path(cfg.corpus.root)
    corpus = load_corpus(cfg.corpus.name, root, **cfg.corpus.options)
    records = sorted(corpus.records, key=lambda r: r.id)
    duplicates = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    if duplicates:
        raise CorpusError(f"duplicate record ids in the corpus, e.g. {duplicates[:3]}")

    acoustic = analyze_corpus(records, root, out, cfg, executor)

    calibration_path = out / "calibration.json"
    if cfg.acoustic.calibration:
        calibration = Calibration.load(cfg.acoustic.calibration)
        calibration.save(calibration_path)
    elif calibration_path.is_file():
        calibration = Calibration.load(calibration_path)
    else:
        split = cfg.acoustic.calibration_split
        calibration = Calibration.fit(((r.corpus, r.gender, acoustic[r.id]["features"]) for r in records
                                       if r.split == split and "features" in acoustic.get(r.id, {})), split=split)
        calibration.save(calibration_path)
    train_votes = [[v.emotion for v in r.votes] + [s for v in r.votes for s in v.secondary]
                   for r in records if r.split == "train"]
    label_space = sorted({e for r in records for e in r.distribution if r.distribution.get(e, 0) > 0}
                         | {r.label for r in records if r.label})
    _atomic_json(out / "cooccurrence.json", cooccurrence_matrix(train_votes, label_space))

    selected = _select(records, cfg)
    by_id = {r.id: r for r in selected}
    shards = _plan(out, "generate", _shards([r.id for r in selected], cfg.shard_size))
    shard_root = out / "shards"
    shard_root.mkdir(exist_ok=True)
    tmp_suffix = f".tmp-w{cfg.worker_index}"  # per worker: never remove another worker's shard in flight
    for stale in shard_root.glob(f"*{tmp_suffix}"):  # unfinished shards, and old copies a retry left behind
        shutil.rmtree(stale)
    mine = [i for i in range(len(shards)) if i % cfg.num_workers == cfg.worker_index]
    done = [i for i in range(len(shards)) if (shard_root / f"{i:05d}").is_dir()]
    retry = {i: ids for i in mine if i in done and (ids := _teacher_failures(shard_root / f"{i:05d}"))} if (
        cfg.retry_teacher_failures) else {}
    teacher = get_teacher(cfg.teacher, work_dir=out)
    generator = Generator(cfg, calibration, acoustic, teacher, label_space)
    if cfg.dedup_scope == "run":
        for i in done:
            for row in _read_jsonl(shard_root / f"{i:05d}" / "records.jsonl"):
                if row["id"] in retry.get(i, ()):
                    continue  # generated again below: its old rationale must not count as already seen
                parsed_think = row["response"].split("<think>")[-1].split("</think>")[0]
                generator.seen.add(think_hash(parsed_think.strip()))
    bar = _progress(sum(len(shards[i]) for i in mine), sum(len(shards[i]) for i in done if i in mine),
                    f"datagen[{teacher.name}]", cfg.progress)
    if retry:
        logger.info("generating again %d record(s) whose teacher request failed, in %d finished shard(s)",
                    sum(map(len, retry.values())), len(retry))
    jobs = []  # (shard, records to generate): a whole missing shard, or the failed records of a finished one
    for index in mine:
        if (shard_root / f"{index:05d}").is_dir():
            if index in retry:
                jobs.append((index, [by_id[i] for i in shards[index] if i in retry[index]]))
            continue
        jobs.append((index, [by_id[i] for i in shards[index]]))
    for index, result in executor.generate(generator, jobs):
        ids = shards[index]
        final = shard_root / f"{index:05d}"
        if final.is_dir():
            _retry_shard(result, final, ids, retry[index], tmp_suffix)
            continue
        tmp = shard_root / f"{index:05d}{tmp_suffix}"
        tmp.mkdir()
        for name, rows in result.items():
            _write_jsonl(tmp / f"{name}.jsonl", rows)
        os.replace(tmp, final)
        bar.update(len(ids))
    bar.close()
    missing = [i for i in range(len(shards)) if not (shard_root / f"{i:05d}").is_dir()]
    if missing:
        # Other workers still have shards to finish; whichever worker completes the last one merges.
        logger.info("worker %d/%d done; %d shard(s) left to other workers", cfg.worker_index, cfg.num_workers,
                    len(missing))
        return {"complete": False, "worker_index": cfg.worker_index, "shards_left": len(missing),
                "shards": len(shards)}
    return merge(out, cfg, shards, corpus.errors, acoustic, teacher, time.time() - start)


def _teacher_failures(shard: Path) -> set[str]:
    """Ids of a finished shard's records with a failed teacher request (the record or one of its pair negatives)."""
    return {row["id"] for row in _read_jsonl(shard / "rejected.jsonl") if row.get("reason") == "teacher_error"}


def _retry_shard(result: dict[str, list[dict]], final: Path, ids: list[str], retry_ids: set[str],
                 tmp_suffix: str) -> None:
    """Rewrite a shard with ``result``, ``retry_ids`` generated again: their old rows out, the new ones in, in the
    plan's order.

    The new shard is written beside the old one and swapped in with two renames; a crash between them leaves no
    finished shard, which the next start then generates whole (the stale copy is removed on start)."""
    rank = {record_id: k for k, record_id in enumerate(ids)}
    tmp = final.with_name(final.name + tmp_suffix)
    tmp.mkdir()
    for name, new_rows in result.items():
        rows = [row for row in _read_jsonl(final / f"{name}.jsonl") if row.get("id") not in retry_ids] + new_rows
        rows.sort(key=lambda row: rank.get(row.get("id"), len(rank)))  # stable: a record's own rows keep their order
        _write_jsonl(tmp / f"{name}.jsonl", rows)
    old = final.with_name(final.name + ".old" + tmp_suffix)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def merge(out: Path, cfg: DatagenConfig, shards, adapter_errors, acoustic, teacher, elapsed: float) -> dict:
    """Concatenate the shards (in plan order) into the run's outputs; idempotent."""
    collected: dict[str, list[dict]] = {k: [] for k in ("records", "rejected", "pairs", "errors", "dropped",
                                                        "teacher_chats")}
    for index in range(len(shards)):
        for name in collected:
            collected[name].extend(_read_jsonl(out / "shards" / f"{index:05d}" / f"{name}.jsonl"))
    records = [EmotionRecord.from_dict(row) for row in collected["records"]]
    pairs = [EmotionRecord.from_dict(row) for row in collected["pairs"]]
    write_records(records, out / "records.jsonl")
    write_records(pairs, out / "pairs.jsonl")
    if cfg.write_parquet:
        write_records(records, out / "records.parquet")
        write_records(pairs, out / "pairs.parquet")
    _atomic_jsonl(out / "rejected.jsonl", collected["rejected"])
    _atomic_jsonl(out / "teacher_chats.jsonl", collected["teacher_chats"])
    errors = list(adapter_errors) + [row for row in acoustic.values() if "reason" in row]
    _atomic_jsonl(out / "errors.jsonl", errors)
    kinds = Counter(entry["kind"] for line in pairs for entry in line.meta["rejected"])
    summary = {
        "complete": True,
        "inputs": sum(len(s) for s in shards),
        "kept": len(records),
        "dropped": len(collected["dropped"]),
        "bad_audio": len(collected["errors"]),
        "bad_audio_all_clips": len(errors),
        "rejections_by_reason": dict(Counter(r["reason"] for r in collected["rejected"]).most_common()),
        "dropped_by_reason": dict(Counter(r["reason"] for r in collected["dropped"]).most_common()),
        "teacher_failures": sum(r["reason"] == "teacher_error" for r in collected["rejected"]),  # after retries
        "pairs": len(pairs),
        "pair_negatives_by_kind": dict(kinds),
        "teacher": {"name": teacher.name, "model": teacher.model_id},
        "shards": len(shards),
        "elapsed_seconds": round(elapsed, 2),
        "emoreason": __version__,
    }
    _atomic_json(out / "summary.json", summary)
    return summary


def read_outputs(out: str | os.PathLike) -> dict[str, Any]:
    """Convenience for tests and downstream stages: the run's records, pairs and summary."""
    out = Path(out)
    return {"records": read_records(out / "records.jsonl"), "pairs": read_records(out / "pairs.jsonl"),
            "summary": json.loads((out / "summary.json").read_text()),
            "rejected": _read_jsonl(out / "rejected.jsonl"), "errors": _read_jsonl(out / "errors.jsonl")}
