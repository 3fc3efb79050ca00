"""Judges for the reasoning-quality reward: each scores rationales in [0, 1] (None where it could not score).

- ``cue_heuristic`` (offline, the default): the share of the clip's measured cues the rationale states correctly,
  minus the share it contradicts. Cheap and deterministic; what CPU runs and tests use.
- ``openai``: any OpenAI-compatible chat endpoint (vLLM, the built-in server, a hosted API) rates the rationale 0-10
  against a rubric; network errors and unreadable replies give None (logged), never an exception.
- ``reward_model``: a local sequence-classification checkpoint (safetensors, no remote code); sigmoid of its logit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)

RUBRIC = (
    "You grade the reasoning of a speech-emotion model. You get the measured acoustic cues of a clip, its "
    "transcript, and the model's rationale. Rate from 0 to 10 how well the rationale is grounded: it cites the cues "
    "correctly, does not invent cues, uses the words of the transcript sensibly, and its conclusion follows from "
    "the evidence. Reply with the number only."
)


class Judge(Protocol):
    def score(self, rationales: Sequence[str], contexts: Sequence[Mapping[str, Any]]) -> list[float | None]: ...


class CueHeuristicJudge:
    """Correct cue statements / measured cues - contradicted ones / measured cues, clipped to [0, 1]."""

    def score(self, rationales, contexts):
        from .rewards import CUE_VOCABULARY, cue_claims

        scores: list[float | None] = []
        for rationale, context in zip(rationales, contexts):
            cues = context.get("cues") or {}
            measured = {c: str(cues[c]).lower() for c in CUE_VOCABULARY if cues.get(c)}
            if not measured:
                scores.append(None)
                continue
            claims = cue_claims(rationale)
            right = sum(1 for c, levels in claims.items() if c in measured and measured[c] in levels)
            wrong = sum(len(levels - {measured[c]}) for c, levels in claims.items() if c in measured)
            scores.append(min(1.0, max(0.0, (right - wrong) / len(measured))))
        return scores


class OpenAIJudge:
    """Rates rationales through an OpenAI-compatible chat endpoint (``base_url`` e.g. http://127.0.0.1:8000/v1)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 2, temperature: float = 0.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=timeout,
                             max_retries=max_retries)
        self.model = model
        self.temperature = temperature

    def _one(self, rationale: str, context: Mapping[str, Any]) -> float | None:
        cues = ", ".join(f"{k}={v}" for k, v in sorted((context.get("cues") or {}).items()))
        user = f"Measured cues: {cues or 'none'}\nTranscript: {context.get('transcript') or 'unknown'}\n" \
               f"Rationale:\n{rationale}"
        try:
            reply = self.client.chat.completions.create(
                model=self.model, temperature=self.temperature, max_tokens=8,
                messages=[{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}],
            )
            text = reply.choices[0].message.content or ""
        except Exception as err:  # a judge outage must not stop training: the reward becomes None for this row
            logger.warning("judge request failed: %s", err)
            return None
        match = re.search(r"\d+(?:\.\d+)?", text)
        if not match:
            logger.warning("judge reply has no score: %r", text[:80])
            return None
        return min(1.0, max(0.0, float(match.group()) / 10.0))

    def score(self, rationales, contexts):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(self._one, rationales, contexts))


class RewardModelJudge:
    """A local reward model: ``AutoModelForSequenceClassification`` over "cues + rationale" text."""

    def __init__(self, path: str, device: str | None = None, max_length: int = 1024):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
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


JUDGES: dict[str, Callable[..., Judge]] = {
    "cue_heuristic": CueHeuristicJudge,
    "openai": OpenAIJudge,
    "reward_model": RewardModelJudge,
}


def get_judge(name: str, **options) -> Judge:
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
    return JUDGES[name](**options)
