"""The reasoning judge of the evaluator: a model behind an OpenAI-compatible endpoint grades a rationale with a
rubric from the registry in :mod:`emoreason.data.judging` (the one the GRPO ``reasoning`` reward uses too).

The rubric, the fencing of untrusted text (transcript, cues, rationale, answer: between markers with a random id
per request) and the reading of the verdict all live in :mod:`emoreason.data.judging`. Because the fence id is
random, the endpoint client's request cache cannot recognise a repeated judgement; this judge therefore keys its
own cache on what is judged (rubric, judge model, cues, transcript, rationale, answer), in the same response cache
file, and asks identical judgements in flight once. Only readable verdicts are cached: a reply without one is asked
again on the next run instead of scoring that rationale 0 forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import asdict, dataclass

from ..data.judging import Rubric, load_rubric
from ..data.schema import EmotionRecord
from .client import EndpointClient


@dataclass
class RubricScore:
    """One graded text: what the judge and the audio verifier (:mod:`.verifier`) both return."""

    score: float | None  # on the rubric's scale; None when the reply had no readable verdict
    normalized: float | None  # mapped to [0, 1]
    reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def graded(client: EndpointClient, rubric: Rubric, request, key: str, **body) -> RubricScore:
    """``request`` (a rendered ``rubric``) sent as ``body`` through ``client`` and its verdict read; kept in the
    client's cache under ``key`` (what is graded: the fence id is random, so the request itself cannot be the key).
    Only readable verdicts are cached: a reply without one is asked again on the next run."""
    cache = getattr(client, "cache", None)
    stored = cache.get(key) if cache is not None else None
    if stored is not None:
        client.stats["cache_hits"] += 1
        return RubricScore(**stored)
    response = await client.chat(**body)
    reply = (response["choices"][0].get("message") or {}).get("content") or ""
    verdict = request.verdict(reply)
    normalized = rubric.normalise(verdict.score)
    usage = response.get("usage") or {}
    result = RubricScore(verdict.score if normalized is not None else None, normalized, verdict.reason,
                         int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    if cache is not None and normalized is not None:
        cache.put(key, asdict(result))
    return result


class RubricJudge:
    """A model behind an OpenAI-compatible endpoint grading rationales with a rubric (the evaluator's judge)."""

    def __init__(self, client: EndpointClient, rubric: str | os.PathLike | Rubric = "groundedness",
                 max_tokens: int = 256):
        self.client = client
        self.rubric = rubric if isinstance(rubric, Rubric) else load_rubric(str(rubric))
        self.name = self.rubric.name
        self.max_tokens = max_tokens
        self._inflight: dict[str, asyncio.Future] = {}

    def texts(self, record: EmotionRecord, rationale: str, answer: str | None) -> dict[str, str]:
        return {"cues": json.dumps(record.cues or {}, ensure_ascii=False, sort_keys=True),
                "transcript": record.transcript or "(none)", "rationale": rationale or "(empty)",
                "answer": answer or "(none)"}

    def messages(self, record: EmotionRecord, rationale: str, answer: str | None) -> list[dict]:
        return self.rubric.render(**self.texts(record, rationale, answer)).messages

    def _key(self, texts: dict[str, str]) -> str:
        payload = json.dumps({"judge": self.client.model if self.client else None, "rubric": self.rubric.name,
                              "system": self.rubric.system, "user": self.rubric.user, "scale": self.rubric.scale,
                              "texts": texts, "max_tokens": self.max_tokens}, sort_keys=True)
        return "judge:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()

    async def score(self, record: EmotionRecord, rationale: str, answer: str | None) -> RubricScore:
        texts = self.texts(record, rationale, answer)
        key = self._key(texts)
        if key in self._inflight:
            return await asyncio.shield(self._inflight[key])
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._score(texts, key)
        except BaseException as err:
            future.set_exception(err)
            future.exception()
            raise
        finally:
            del self._inflight[key]
        future.set_result(result)
        return result

    async def _score(self, texts: dict[str, str], key: str) -> RubricScore:
        request = self.rubric.render(**texts)
        return await graded(self.client, self.rubric, request, key, messages=request.messages, temperature=0.0,
                            max_tokens=self.max_tokens)
