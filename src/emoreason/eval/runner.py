"""Run a suite against an endpoint: every (strategy, record) pair as an async task under the client's concurrency
bound, responses cached on disk (a rerun after a crash asks only what is missing), failures recorded per item and
reported, then metrics and the report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..data.audio import AudioError
from ..data.schema import EmotionRecord, RecordError, iter_records
from .client import EndpointClient, RequestFailed, ResponseCache
from .endpoints import make_client
from .judge import RubricJudge
from .metrics import compute_metrics
from .report import write_report
from .strategies import STRATEGIES, ItemResult, StrategyContext, strategy_needs
from .prompts import PromptSet
from .suite import Suite, load_suite
from .verifier import AudioVerifier

logger = logging.getLogger(__name__)


def select_records(suite: Suite) -> tuple[list[EmotionRecord], dict[str, int]]:
    """The suite's records (split, label set, limit), and how many were left out and why."""
    chosen, skipped = [], Counter()
    for record in iter_records(suite.records):
        if suite.split and record.split != suite.split:
            skipped[f"split is not {suite.split}"] += 1
        elif record.label not in suite.labels:
            skipped["label outside the suite's label set"] += 1
        elif suite.limit is not None and len(chosen) >= suite.limit:
            skipped["beyond the suite's limit"] += 1
        else:
            chosen.append(record)
    return chosen, dict(skipped)


async def _run_item(strategy, ctx: StrategyContext, record: EmotionRecord, label: str, params: dict) -> ItemResult:
    try:
        result = await strategy(ctx, record, **params)
    except (RequestFailed, AudioError, RecordError, FileNotFoundError, ValueError, KeyError) as err:
        # Reported, never dropped: the item counts as invalid in every metric and is listed in the report.
        return ItemResult(record.id, label, failed=True, failure=f"{type(err).__name__}: {err}")
    result.strategy = label
    return result


async def _evaluate(suite: Suite, records: list[EmotionRecord], client: EndpointClient, judge: RubricJudge | None,
                    progress: bool, verifier: AudioVerifier | None = None) -> dict[str, list[ItemResult]]:
    ctx = StrategyContext(client=client, labels=suite.labels, prompts=PromptSet.load(suite.prompts),
                          data_root=suite.data_root, max_tokens=suite.max_tokens,
                          include_transcript=suite.include_transcript, audio_transport=suite.audio_transport,
                          judge=judge, verifier=verifier, seed=suite.seed)
    tasks, owners = [], []
    for spec in suite.strategies:
        for record in records:
            tasks.append(_run_item(STRATEGIES[spec.name], ctx, record, spec.label, spec.params))
            owners.append(spec.label)
    results: dict[str, list[ItemResult]] = {spec.label: [None] * len(records) for spec in suite.strategies}
    positions = {spec.label: 0 for spec in suite.strategies}
    indexed = []
    for owner in owners:
        indexed.append((owner, positions[owner]))
        positions[owner] += 1

    # Items hold their encoded audio while they wait for the client: bound them too, or a large corpus would load
    # every clip at once before the first answer came back.
    item_slots = asyncio.Semaphore(2 * max(1, suite.concurrency) * getattr(client, "replicas", 1))

    async def tracked(i, coro):
        async with item_slots:
            return i, await coro

    with tqdm(total=len(tasks), desc=f"eval {suite.name}", unit="item", disable=not progress) as bar:
        for future in asyncio.as_completed([tracked(i, t) for i, t in enumerate(tasks)]):
            i, result = await future
            owner, position = indexed[i]
            results[owner][position] = result
            bar.update(1)
    return results


async def _judge_items(judge: RubricJudge, records: dict[str, EmotionRecord], items: list[ItemResult]) -> list:
    from ..data.response_format import parse_response

    async def one(item):
        if item.failed or not item.final_text:
            return None
        parsed = parse_response(item.final_text)
        try:
            return await judge.score(records[item.record_id], parsed.think or item.final_text, item.prediction)
        except RequestFailed as err:
            logger.warning("judge failed on %s: %s", item.record_id, err)
            return None

    return list(await asyncio.gather(*(one(item) for item in items)))


def _summary(items: list[ItemResult], judge_scores: list | None = None) -> dict[str, Any]:
    """Tokens the strategy spent per item: every request it made (re-sent turns of self-refine, verifier and judge
    calls of verifying strategies included). The judge metric's calls grade the strategy, they are not part of it:
    counted apart."""
    n = max(1, len(items))
    prompt, completion = sum(i.prompt_tokens for i in items), sum(i.completion_tokens for i in items)
    summary = {
        "prompt_per_item": prompt / n,
        "completion_per_item": completion / n,
        "total_per_item": (prompt + completion) / n,
        "verifier_prompt_per_item": sum(i.verifier_prompt_tokens for i in items) / n,
        "verifier_completion_per_item": sum(i.verifier_completion_tokens for i in items) / n,
        "verifier_per_item": sum(i.verifier_prompt_tokens + i.verifier_completion_tokens for i in items) / n,
        "requests_per_item": sum(i.requests for i in items) / n,
        "prompt_total": prompt,
        "completion_total": completion,
        "total": prompt + completion,
        "answered": sum(i.valid for i in items) / n,  # items with a usable answer under the strategy's own parser
    }
    if judge_scores is not None:
        scored = [s for s in judge_scores if s is not None]
        summary["judge_metric_total"] = sum(s.prompt_tokens + s.completion_tokens for s in scored)
    return summary


async def run_suite_async(
    suite: Suite | str | Path,
    endpoint: str | list[str],  # several: replicas of the model (endpoints.EndpointPool)
    model: str,
    out_dir: str | Path,
    *,
    records: str | Path | None = None,
    data_root: str | Path | None = None,
    api_key: str | None = None,
    strategies: list[str] | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    concurrency: int | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    backoff: float = 1.0,
    cache_path: str | Path | None = None,
    judge_endpoint: str | None = None,
    judge_model: str | None = None,
    judge_api_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    if not isinstance(suite, Suite):
        suite = load_suite(suite, records=records, data_root=data_root)
    if strategies:
        unknown = sorted(set(strategies) - {s.label for s in suite.strategies})
        if unknown:
            raise ValueError(f"strategies {unknown} are not in suite {suite.name} "
                             f"(has {[s.label for s in suite.strategies]})")
        suite.strategies = [s for s in suite.strategies if s.label in strategies]
    if limit is not None:
        suite.limit = limit
    if max_tokens is not None:
        suite.max_tokens = max_tokens
    if concurrency:
        suite.concurrency = concurrency
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen, skipped = select_records(suite)
    if not chosen:
        raise ValueError(f"suite {suite.name}: no records left from {suite.records} (left out: {skipped})")
    cache = ResponseCache(cache_path or out / "responses.sqlite")
    client = make_client(endpoint, model, api_key=api_key, concurrency=concurrency or suite.concurrency,
                         timeout=timeout or suite.timeout,
                         max_retries=suite.retries if retries is None else retries, backoff=backoff, cache=cache)
    judge, judge_client = None, None
    judge_cfg = dict(suite.judge or {})
    if judge_endpoint or judge_cfg.get("endpoint"):
        judge_client = EndpointClient(judge_endpoint or judge_cfg["endpoint"], judge_model or judge_cfg["model"],
                                      api_key=judge_api_key or judge_cfg.get("api_key"),
                                      concurrency=concurrency or suite.concurrency, timeout=timeout or suite.timeout,
                                      max_retries=suite.retries if retries is None else retries, backoff=backoff,
                                      cache=cache)
        judge = RubricJudge(judge_client, judge_cfg.get("rubric", "groundedness"))
    verifier, verifier_client = None, None
    needs = set().union(*(strategy_needs(s.name, s.params) for s in suite.strategies))
    if "judge" in needs and judge is None:
        judged = [s.label for s in suite.strategies if "judge" in strategy_needs(s.name, s.params)]
        raise ValueError(f"suite {suite.name}: strategies {judged} need a judge: add `judge:` to the suite or pass "
                         "--judge-endpoint")
    if "audio_verifier" in needs:
        if suite.verifier is not None and not isinstance(suite.verifier, dict):
            raise ValueError(f"suite {suite.name}: verifier must be a mapping {{endpoint, model, api_key, rubric}}")
        verifier_cfg = dict(suite.verifier or {})
        if verifier_cfg.get("endpoint"):
            verifier_client = EndpointClient(
                verifier_cfg["endpoint"], verifier_cfg.get("model") or model, api_key=verifier_cfg.get("api_key"),
                concurrency=concurrency or suite.concurrency, timeout=timeout or suite.timeout,
                max_retries=suite.retries if retries is None else retries, backoff=backoff, cache=cache)
        verifier = AudioVerifier(verifier_client or client, verifier_cfg.get("rubric", "audio_verifier"),
                                 max_tokens=int(verifier_cfg.get("max_tokens", 128)))
    started = time.time()
    try:
        results = await _evaluate(suite, chosen, client, judge, progress, verifier)
        by_id = {r.id: r for r in chosen}
        report_strategies = {}
        pred_dir = out / "predictions"
        pred_dir.mkdir(exist_ok=True)
        for spec in suite.strategies:
            items = results[spec.label]
            judge_scores = None
            if judge is not None and "judge" in suite.metrics:
                judge_scores = await _judge_items(judge, by_id, items)
                for item, judged in zip(items, judge_scores):  # kept per clip (predictions, the report page)
                    item.judge_score = judged.normalized if judged is not None else None
            metrics = compute_metrics(items, by_id, suite.labels, suite.metrics, ambiguity_bins=suite.ambiguity_bins,
                                      group_by=suite.group_by, judge_scores=judge_scores,
                                      min_group_count=suite.min_group_count)
            with open(pred_dir / f"{spec.label}.jsonl", "w", encoding="utf-8") as fh:
                for item in items:
                    fh.write(json.dumps(dataclasses.asdict(item), ensure_ascii=False) + "\n")
            report_strategies[spec.label] = {
                "strategy": spec.name, "params": spec.params, "metrics": metrics,
                "tokens": _summary(items, judge_scores),
                "failures": [{"record_id": i.record_id, "failure": i.failure} for i in items if i.failed],
                "notes": {i.record_id: i.notes for i in items if i.notes},
            }
    finally:
        await client.close()
        if judge_client is not None:
            await judge_client.close()
        if verifier_client is not None:
            await verifier_client.close()
    report = {
        "suite": suite.name, "model": model, "endpoint": endpoint, "records_path": str(suite.records),
        "data_root": str(suite.data_root), "labels": list(suite.labels), "items": len(chosen),
        "skipped_records": skipped, "strategies": report_strategies, "client": dict(client.stats),
        "seed": suite.seed, "min_group_count": suite.min_group_count,
        "verifier": ({"endpoint": verifier.client.base_url, "model": verifier.client.model,
                      "rubric": verifier.rubric.name} if verifier is not None else None),
        "cache_entries": len(cache), "wall_seconds": round(time.time() - started, 3),
    }
    cache.close()
    report["files"] = {k: str(v) for k, v in write_report(report, out).items()}
    return report


def run_suite(*args, **kwargs) -> dict[str, Any]:
    """Synchronous :func:`run_suite_async`: evaluate, write ``report.json``, ``report.md`` and ``plots/`` under
    ``out_dir``, and return the report."""
    return asyncio.run(run_suite_async(*args, **kwargs))
