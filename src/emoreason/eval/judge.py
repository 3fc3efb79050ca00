"""The reasoning judge: a model behind an OpenAI-compatible endpoint grades a rationale with a rubric from
``eval/judges/``.

Texts that come from the clip (transcript) or from the evaluated model (rationale, answer) are fenced between
markers carrying an id derived from the text itself, so a text cannot close its own fence, and the rubric tells the
judge that fenced text is data. The id is a hash, not a random nonce, so judge requests stay cacheable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.schema import EmotionRecord
from .client import EndpointClient


@dataclass
class JudgeScore:
    score: float | None  # on the rubric's scale; None when the judge's reply had no readable score
    normalized: float | None  # mapped to [0, 1]
    reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def fence(name: str, text: str) -> str:
    tag = f"{name.upper()}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"
    return f"<<<{tag}>>>\n{text}\n<<<END {tag}>>>"


_SCORE_RE = re.compile(r'"score"\s*:\s*(-?[0-9]+(?:\.[0-9]+)?)')


def parse_judge_reply(text: str) -> tuple[float | None, str | None]:
    for candidate in re.findall(r"\{.*?\}", text or "", re.S):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("score"), (int, float)):
            return float(data["score"]), data.get("reason")
    match = _SCORE_RE.search(text or "")
    return (float(match.group(1)), None) if match else (None, None)


class Judge:
    def __init__(self, client: EndpointClient, rubric: str | os.PathLike):
        self.client = client
        data = yaml.safe_load(Path(rubric).read_text(encoding="utf-8"))
        missing = [k for k in ("system", "user", "scale") if k not in data]
        if missing:
            raise ValueError(f"{rubric}: rubric misses {missing}")
        self.name = data.get("name", Path(rubric).stem)
        self.system, self.user = data["system"], data["user"]
        self.low, self.high = (float(v) for v in data["scale"])

    def messages(self, record: EmotionRecord, rationale: str, answer: str | None) -> list[dict]:
        cues = json.dumps(record.cues or {}, ensure_ascii=False, sort_keys=True)
        user = self.user.format(
            cues=fence("cues", cues), transcript=fence("transcript", record.transcript or "(none)"),
            rationale=fence("rationale", rationale or "(empty)"), answer=fence("answer", answer or "(none)"),
        )
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    async def score(self, record: EmotionRecord, rationale: str, answer: str | None) -> JudgeScore:
        response = await self.client.chat(messages=self.messages(record, rationale, answer), temperature=0.0,
                                          max_tokens=128)
        text = (response["choices"][0].get("message") or {}).get("content") or ""
        raw, reason = parse_judge_reply(text)
        usage = response.get("usage") or {}
        normalized = None
        if raw is not None:
            raw = min(self.high, max(self.low, raw))
            normalized = (raw - self.low) / (self.high - self.low)
        return JudgeScore(raw, normalized, reason, int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))
