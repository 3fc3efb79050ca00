"""The data-generation run: corpus -> acoustic cues -> calibration -> teacher rationales -> filters -> pairs.

This module orchestrates: it plans the shards, resumes, retries teacher failures and merges. The passes themselves
are acoustic_phase.py and generation.py, computed where the executor (executors.py) says; run_files.py writes.

Runs are sharded and resumable. The plan (which record ids go into which shard) is fixed on the first start and
saved; each shard's outputs are written to a temporary folder renamed into place only when the shard is complete,
so a run killed at any moment and restarted redoes at most the shards in flight and ends with every input exactly
once (kept, dropped by the filters, or reported as bad audio). Several processes (GPUs, nodes) can share a run
(``num_workers``, ``worker_index``): each analyses and generates its share of the shards (a worker that finishes
its acoustic share early goes on with the shards still missing, from the far end, so a lone worker completes the
run), and the one that completes the last shard merges. Generation shards are large (``shard_size``, 512 prompts x
``num_samples``), enough to fill a vLLM engine's batches; acoustic shards are small (``acoustic.shard_size``).

Clips that cannot be described (acoustic_phase.py says which) go to errors.jsonl with the reason, never into
records or the calibration. A teacher request that still fails after the client's retries drops that clip
(rejected.jsonl, reason ``teacher_error``, counted in the summary) and the run goes on; an endpoint that cannot be
reached at all stops the run, which resumes where it stopped.

Outputs under ``output_dir``:

    records.jsonl / records.parquet   kept EmotionRecords (task, instruction, response, cues, meta.provenance)
    pairs.jsonl / pairs.parquet       DPO pairs: response = chosen, meta["rejected"] = [{text, kind, detail}]
    rejected.jsonl                    one line per rejected sample: id, sample, reason, detail, text, outcome
    errors.jsonl                      bad audio / unreadable clips with the reason
    teacher_chats.jsonl               each kept rationale with the prompt that asked for it, as a chat
    calibration.json                  tertile edges fitted on the training split (reused for every split)
    cooccurrence.json                 emotion co-occurrence of the training split's votes
    summary.json                      counts: kept, dropped, bad audio, rejections by reason, pairs by kind
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..data.corpora import CorpusError, load_corpus
from ..data.labels import cooccurrence_matrix
from ..data.schema import EmotionRecord, read_records, write_records
from .acoustic_phase import analyze_corpus, calibration_for
from .config import DatagenConfig
from .executors import open_executor
from .generation import Generator, select_for_generation
from .run_files import (atomic_json, atomic_jsonl, fixed_plan, progress_bar, read_jsonl, rewrite_shard,
                        split_into_shards, teacher_failures, write_jsonl)
from .teachers import get_teacher

logger = logging.getLogger(__name__)


def run(cfg: DatagenConfig, executor=None) -> dict:
    """The run on ``executor``, by default the one ``cfg.executor`` names (opened and closed here). Plan, shard files,
    resume, teacher-failure retries and the merge are the same for every executor."""
    if executor is None:
        with open_executor(cfg) as opened:
            return run(cfg, opened)
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
    calibration = calibration_for(records, acoustic, out, cfg)
    train_votes = [[v.emotion for v in r.votes] + [s for v in r.votes for s in v.secondary]
                   for r in records if r.split == "train"]
    label_space = sorted({e for r in records for e in r.distribution if r.distribution.get(e, 0) > 0}
                         | {r.label for r in records if r.label})
    atomic_json(out / "cooccurrence.json", cooccurrence_matrix(train_votes, label_space))

    selected = select_for_generation(records, cfg)
    shards = fixed_plan(out, "generate", split_into_shards([r.id for r in selected], cfg.shard_size))
    teacher = get_teacher(cfg.teacher, work_dir=out)
    generator = Generator(cfg, calibration, acoustic, teacher, label_space)
    generate_shards(out, cfg, shards, {r.id: r for r in selected}, generator, executor)
    missing = [i for i in range(len(shards)) if not (out / "shards" / f"{i:05d}").is_dir()]
    if missing:
        # Other workers still have shards to finish; whichever worker completes the last one merges.
        logger.info("worker %d/%d done; %d shard(s) left to other workers", cfg.worker_index, cfg.num_workers,
                    len(missing))
        return {"complete": False, "worker_index": cfg.worker_index, "shards_left": len(missing),
                "shards": len(shards)}
    return merge(out, cfg, shards, corpus.errors, acoustic, teacher, time.time() - start)


def generate_shards(out: Path, cfg: DatagenConfig, shards: list[list[str]], by_id: dict[str, EmotionRecord],
                    generator: Generator, executor) -> None:
    """Write this worker's missing generation shards, and (``retry_teacher_failures``) rewrite its finished ones
    whose teacher requests failed, with those records generated again."""
    shard_root = out / "shards"
    shard_root.mkdir(exist_ok=True)
    tmp_suffix = f".tmp-w{cfg.worker_index}"  # per worker: never remove another worker's shard in flight
    for stale in shard_root.glob(f"*{tmp_suffix}"):  # unfinished shards, and old copies a retry left behind
        shutil.rmtree(stale)
    mine = [i for i in range(len(shards)) if i % cfg.num_workers == cfg.worker_index]
    done = {i for i in range(len(shards)) if (shard_root / f"{i:05d}").is_dir()}
    retry = {i: ids for i in mine if i in done and (ids := teacher_failures(shard_root / f"{i:05d}"))} if (
        cfg.retry_teacher_failures) else {}
    if cfg.dedup_scope == "run":
        for i in done:
            for row in read_jsonl(shard_root / f"{i:05d}" / "records.jsonl"):
                if row["id"] not in retry.get(i, ()):  # one generated again must not count as already seen
                    generator.remember_kept(row["response"])
    bar = progress_bar(sum(len(shards[i]) for i in mine), sum(len(shards[i]) for i in done if i in mine),
                       f"datagen[{generator.teacher.name}]", cfg.progress)
    if retry:
        logger.info("generating again %d record(s) whose teacher request failed, in %d finished shard(s)",
                    sum(map(len, retry.values())), len(retry))
    jobs = []  # (shard, records to generate): a whole missing shard, or the failed records of a finished one
    for index in mine:
        if index not in done:
            jobs.append((index, [by_id[i] for i in shards[index]]))
        elif index in retry:
            jobs.append((index, [by_id[i] for i in shards[index] if i in retry[index]]))
    for index, result in executor.generate(generator, jobs):
        ids = shards[index]
        final = shard_root / f"{index:05d}"
        if index in retry:  # a finished shard (only this worker writes its own shards)
            rewrite_shard(result, final, ids, retry[index], tmp_suffix)
            continue
        tmp = shard_root / f"{index:05d}{tmp_suffix}"
        tmp.mkdir()
        for name, rows in result.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        os.replace(tmp, final)
        bar.update(len(ids))
    bar.close()


def merge(out: Path, cfg: DatagenConfig, shards, adapter_errors, acoustic, teacher, elapsed: float) -> dict:
    """Concatenate the shards (in plan order) into the run's outputs; idempotent."""
    collected: dict[str, list[dict]] = {k: [] for k in ("records", "rejected", "pairs", "errors", "dropped",
                                                        "teacher_chats")}
    for index in range(len(shards)):
        for name in collected:
            collected[name].extend(read_jsonl(out / "shards" / f"{index:05d}" / f"{name}.jsonl"))
    records = [EmotionRecord.from_dict(row) for row in collected["records"]]
    pairs = [EmotionRecord.from_dict(row) for row in collected["pairs"]]
    write_records(records, out / "records.jsonl")
    write_records(pairs, out / "pairs.jsonl")
    if cfg.write_parquet:
        write_records(records, out / "records.parquet")
        write_records(pairs, out / "pairs.parquet")
    atomic_jsonl(out / "rejected.jsonl", collected["rejected"])
    atomic_jsonl(out / "teacher_chats.jsonl", collected["teacher_chats"])
    errors = list(adapter_errors) + [row for row in acoustic.values() if "reason" in row]
    atomic_jsonl(out / "errors.jsonl", errors)
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
    atomic_json(out / "summary.json", summary)
    return summary


def read_outputs(out: str | os.PathLike) -> dict[str, Any]:
    """Convenience for tests and downstream stages: the run's records, pairs and summary."""
    out = Path(out)
    return {"records": read_records(out / "records.jsonl"), "pairs": read_records(out / "pairs.jsonl"),
            "summary": json.loads((out / "summary.json").read_text(encoding="utf-8")),
            "rejected": read_jsonl(out / "rejected.jsonl"), "errors": read_jsonl(out / "errors.jsonl")}
