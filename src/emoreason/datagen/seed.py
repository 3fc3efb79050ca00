"""Seed descriptions (DeSTA form), instruction pools and prompt templates.

A seed description is what the teacher LLM "hears": the clip as text, e.g.

    [00:00-00:03] "I can't believe it." (Gender: female, Pitch: high, Volume: loud, Speaking rate: fast,
    Intonation: rising, Annotators: angry 3/5, frustrated 2/5)

The teacher writes the rationale from it; the training target then pairs that rationale with the real audio.
Perturbed copies (a flipped cue, a wrong target, an irrelevant detail) feed the DPO rejected responses.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.cues import CUES
from ..data.schema import EmotionRecord

def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


@dataclass
class SeedDescription:
    duration: float
    transcript: str | None
    gender: str | None
    cues: dict
    annotators: list[tuple[str, int]] = field(default_factory=list)  # (emotion, votes), most votes first
    raters: int = 0
    context: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # added details (spurious cues)

    @classmethod
    def from_record(cls, record: EmotionRecord, cues: dict) -> SeedDescription:
        counts = Counter(v.emotion for v in record.votes if v.emotion)
        if not counts and record.label:
            counts = Counter({record.label: 1})
        return cls(duration=record.duration, transcript=record.transcript, gender=record.gender, cues=dict(cues),
                   annotators=counts.most_common(), raters=sum(counts.values()), context=list(record.context))

    def render(self, annotators: bool = True) -> str:
        parts = []
        if self.gender:
            parts.append(f"Gender: {self.gender}")
        for key, cue in CUES.items():
            if self.cues.get(key):
                parts.append(f"{cue.label}: {self.cues[key]}")
        parts.extend(self.extra)
        if annotators and self.annotators:
            parts.append("Annotators: " + ", ".join(f"{e} {n}/{self.raters}" for e, n in self.annotators))
        said = f'"{self.transcript}"' if self.transcript else "(no transcript)"
        line = f"[00:00-{_clock(self.duration)}] {said} ({', '.join(parts)})"
        if self.context:
            line = "Earlier in the conversation:\n" + "\n".join(f"  {c}" for c in self.context) + "\n" + line
        return line

    def with_cue(self, key: str, value: str) -> SeedDescription:
        return replace(self, cues={**self.cues, key: value})

    def with_extra(self, detail: str) -> SeedDescription:
        return replace(self, extra=[*self.extra, detail])


def hallucinate_cue(description: SeedDescription, rng: random.Random) -> tuple[SeedDescription, str, str] | None:
    """Flip one measured cue to a contradicting value; returns (description, cue, false value)."""
    options = [k for k, cue in CUES.items() if description.cues.get(k) in cue.opposite]
    if not options:
        return None
    key = rng.choice(sorted(options))
    false_value = CUES[key].opposite[description.cues[key]]
    return description.with_cue(key, false_value), key, false_value


def spurious_detail(description: SeedDescription, rng: random.Random) -> str:
    """A true but emotion-irrelevant fact about the clip."""
    options = [f"Clip length: {description.duration:.1f} seconds"]
    if description.gender:
        options.append(f"Speaker gender: {description.gender}")
    if description.transcript:
        options.append(f"Number of words: {len(description.transcript.split())}")
    return rng.choice(options)


# -- instruction pools and prompt templates ---------------------------------------------------------------------
def load_pool(path: str | Path) -> list[str]:
    """One instruction per line; blank lines and lines starting with '#' are skipped."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    pool = [line for line in lines if line and not line.startswith("#")]
    if not pool:
        raise ValueError(f"instruction pool {path} is empty")
    return pool


@dataclass
class PromptTemplate:
    """A teacher prompt with ``{description}``, ``{instruction}``, ``{target}``, ``{format}`` fields."""

    text: str
    prompt_id: str

    @classmethod
    def load(cls, path: str | Path) -> PromptTemplate:
        text = Path(path).read_text(encoding="utf-8")
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        return cls(text=text, prompt_id=f"{Path(path).stem}@{digest}")

    def render(self, **fields) -> str:
        return self.text.format(**fields).strip()


def answer_format(target: str, distribution: dict[str, float] | None) -> str:
    """The format instruction the prompts end with (the canonical think/answer/distribution layout)."""
    text = f"<think>\n(your reasoning)\n</think>\n<answer>{target}</answer>"
    if distribution:
        shares = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(distribution.items(), key=lambda kv: -kv[1]) if v > 0)
        text += f"\n<distribution>{shares}</distribution>"
    return text


def pick(pool: list[str], key: str, seed: int) -> str:
    """Deterministic choice per (record, seed): resuming a run picks the same instruction."""
    digest = hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()
    return pool[int(digest[:8], 16) % len(pool)]
