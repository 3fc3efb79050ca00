"""Judges for the reasoning-quality reward: each scores rationales in [0, 1] (None where it could not score).

- ``cue_heuristic`` (offline, the default): the share of the clip's measured cues the rationale states correctly,
  minus the share it contradicts, with claims read by :func:`emoreason.data.cues.ground` (the reader the datagen
  filter, the ``cue_grounding`` reward and the evaluator's reasoning metric use). Cheap and deterministic.
- ``openai``: any OpenAI-compatible chat endpoint (vLLM, the built-in server, a hosted API) grades the rationale with
  a rubric from :mod:`emoreason.data.judging` (default ``groundedness``, the evaluator's rubric): same fencing, same
  verdict parser, same mapping to [0, 1]. Requests go through :class:`emoreason.data.endpoint.ChatEndpoint`, the one
  client every stage uses (key from ``$api_key_env``, timeouts, retries with backoff on connection errors, 408/409/
  429, 5xx and malformed replies). :meth:`OpenAIJudge.probe` (called by the GRPO entry point through
  :func:`emoreason.train.rewards.probe_reward_funcs` before the model loads) stops a run whose judge is down at
  start; a request that still fails after its retries raises :class:`JudgeUnavailable` (a reward silently missing
  for a whole run would train a different objective). A reply without a readable verdict (including a reply that
  stays malformed after the retries), or a request the endpoint refuses as malformed (400/422, e.g. too long), gives
  None for that completion (logged).
- ``reward_model``: a local sequence-classification checkpoint (safetensors, no remote code); sigmoid of its logit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..data.cues import ground, measured_levels
from ..data.endpoint import ChatEndpoint, EndpointError
from ..data.judging import load_rubric

logger = logging.getLogger(__name__)


class JudgeUnavailable(RuntimeError):
    """The judge endpoint cannot be reached (at start, or after every retry of a request)."""


class RewardJudge(Protocol):
    def score(self, rationales: Sequence[str], contexts: Sequence[Mapping[str, Any]]) -> list[float | None]: ...


class CueHeuristicJudge:
    """Correct cue statements / measured cues - contradicted ones / measured cues, clipped to [0, 1]."""

    def score(self, rationales, contexts):
        scores: list[float | None] = []
        for rationale, context in zip(rationales, contexts):
            cues = context.get("cues") or {}
            measured = measured_levels(cues)
            if not measured:
                scores.append(None)
                continue
            checked = ground(rationale, cues)
            scores.append(min(1.0, max(0.0, (len(checked.supported) - len(checked.contradicted)) / len(measured))))
        return scores


class OpenAIJudge:
    """Grades rationales through an OpenAI-compatible chat endpoint (``base_url`` e.g. http://127.0.0.1:8000/v1)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 2, temperature: float = 0.0, rubric: str = "groundedness", max_tokens: int = 256,
                 workers: int = 8):
        # The key only ever from the environment (recipes are shared; a key in judge_options would travel with them).
        self.client = ChatEndpoint(base_url, model, api_key_env=api_key_env, timeout=timeout,
                                   max_retries=max_retries, backoff=0.5, max_backoff=8.0)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.workers = workers
        self.rubric = load_rubric(rubric)

    def probe(self) -> None:
        """One tiny request: raises :class:`JudgeUnavailable` with the endpoint when the judge cannot answer."""
        try:
            self.client.chat(max_completion_tokens=1, temperature=0.0, messages=[{"role": "user", "content": "ping"}])
            return
        except EndpointError as err:
            if err.malformed:  # it answered (one token may leave a reasoning model's content empty): it is up
                return
            failure: Exception = err
        except Exception as err:  # e.g. a base_url that is not a URL
            failure = err
        raise JudgeUnavailable(f"reasoning judge at {self.client.base_url} (model {self.client.model!r}) does not "
                               f"answer: {type(failure).__name__}: {failure}. Start it, fix judge_options, or use "
                               "judge: cue_heuristic") from failure

    def _one(self, rationale: str, context: Mapping[str, Any]) -> float | None:
        request = self.rubric.render(
            cues=json.dumps(dict(context.get("cues") or {}), ensure_ascii=False, sort_keys=True),
            transcript=context.get("transcript") or "(none)", rationale=rationale or "(empty)",
            answer=context.get("answer") or "(none)")
        try:
            reply = self.client.chat(temperature=self.temperature, max_completion_tokens=self.max_tokens,
                                     messages=request.messages)
        except EndpointError as err:
            if err.status in (400, 422) or err.malformed:  # e.g. too long; or a reply with no text, every time
                logger.warning("judge gave no verdict for one request (no score for this completion): %s", err)
                return None
            # connection, timeout, 5xx, 429 after retries; 401/403/404 at once
            raise JudgeUnavailable(f"reasoning judge at {self.client.base_url} failed: {err}") from err
        text = reply["choices"][0]["message"]["content"]
        score = self.rubric.normalise(request.verdict(text).score)
        if score is None:
            logger.warning("judge reply has no verdict on the %s..%s scale: %r", *self.rubric.scale, text[-120:])
        return score

    def score(self, rationales, contexts):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._one, rationales, contexts))


class RewardModelJudge:
    """A local reward model: ``AutoModelForSequenceClassification`` over "cues + rationale" text."""

    def __init__(self, path: str, device: str | None = None, max_length: int = 1024):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..modeling.loading import safe_load_kwargs

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, **safe_load_kwargs()).eval()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.max_length = max_length

    def score(self, rationales, contexts):
        import torch

        texts = [f"cues: {dict(c.get('cues') or {})}\n{r}" for r, c in zip(rationales, contexts)]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.no_grad():
            logits = self.model(**batch.to(self.device)).logits[:, 0]
        return torch.sigmoid(logits.float()).tolist()


JUDGES: dict[str, Callable[..., RewardJudge]] = {
    "cue_heuristic": CueHeuristicJudge,
    "openai": OpenAIJudge,
    "reward_model": RewardModelJudge,
}


def get_judge(name: str, **options) -> RewardJudge:
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
    return JUDGES[name](**options)
