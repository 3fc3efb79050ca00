"""Rejection filters for teacher rationales. Each returns ``None`` (pass) or ``(reason, detail)``.

Filters are a registry (``FILTERS``) applied in order; the first failure is the recorded reason. Answers are read
with the shared :func:`~emoreason.data.response_format.parse_response` and cue claims with
:func:`~emoreason.data.cues.contradictions`: the parsers the GRPO rewards and the evaluator's metrics use.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..data.audio_tokens import AUDIO_TOKEN
from ..data.cues import contradictions
from ..data.response_format import ParsedResponse, parse_response
from ..data.schema import EmotionRecord


@dataclass
class FilterConfig:
    enabled: list[str] = field(default_factory=lambda: list(FILTERS))
    answer_must_match: str = "votes"  # "votes": any emotion a rater chose; "consensus": the consensus label
    min_words: int = 12
    max_words: int = 250
    require_distribution: bool = False


@dataclass
class Candidate:
    text: str
    record: EmotionRecord
    cues: Mapping
    parsed: ParsedResponse
    seen: set  # normalised-think hashes already accepted (for this record or the run)


LEAK_RE = re.compile(
    r"\b(annotat\w*|rater\w*|raters?|votes?|voted|voting|the label\w*|labell?ed|ground[- ]truth|metadata|"
    r"the description|as described|seed description|according to the (?:data|cues list))\b", re.I)

def normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


# -- the filters --------------------------------------------------------------------------------------------------
def check_format(c: Candidate, cfg: FilterConfig):
    if not c.parsed.valid:
        return "format", ",".join(c.parsed.errors)
    if cfg.require_distribution and not c.parsed.distribution:
        return "format", "missing_distribution"
    if AUDIO_TOKEN in c.text:
        # A training target must not hold the placeholder: the processor would read it as the audio token, which the
        # model never writes (generation suppresses it). Whatever the teacher (an endpoint, vLLM under Ray).
        return "format", "audio_placeholder"
    return None


def allowed_answers(record: EmotionRecord, mode: str) -> set[str]:
    if mode == "consensus":
        return {record.label} if record.label else set()
    voted = {v.emotion for v in record.votes if v.emotion}
    return voted or ({record.label} if record.label else set())


def check_answer(c: Candidate, cfg: FilterConfig):
    allowed = allowed_answers(c.record, cfg.answer_must_match)
    if c.parsed.answer not in allowed:
        return "answer", f"{c.parsed.answer!r} not in {sorted(allowed)} ({cfg.answer_must_match})"
    return None


def check_leakage(c: Candidate, cfg: FilterConfig):
    match = LEAK_RE.search(c.parsed.think or c.text)
    return ("leakage", f"mentions {match.group(0)!r}") if match else None


def check_opens_with_answer(c: Candidate, cfg: FilterConfig):
    think = (c.parsed.think or "").strip()
    first = re.split(r'(?<=[.!?])["\u201d]?\s+(?=[A-Z])', think, maxsplit=1)[0].lower()
    first = re.sub(r'"[^"]*"', '""', first)  # quoting the transcript is not naming the answer
    if c.parsed.answer and re.search(rf"\b{re.escape(c.parsed.answer)}\b", first):
        return "opens_with_answer", first[:80]
    return None


def check_cues(c: Candidate, cfg: FilterConfig):
    found = contradictions(c.parsed.think or c.text, c.cues)
    return ("cue_contradiction", "; ".join(found)) if found else None


def check_length(c: Candidate, cfg: FilterConfig):
    n = len((c.parsed.think or "").split())
    if n < cfg.min_words:
        return "length", f"{n} words < {cfg.min_words}"
    if n > cfg.max_words:
        return "length", f"{n} words > {cfg.max_words}"
    return None


def check_duplicate(c: Candidate, cfg: FilterConfig):
    return ("duplicate", "same reasoning already kept") if think_hash(c.parsed.think or "") in c.seen else None


def think_hash(think: str) -> str:
    return hashlib.sha1(normalise(think).encode()).hexdigest()


FILTERS: dict[str, Callable[[Candidate, FilterConfig], tuple[str, str] | None]] = {
    "format": check_format,
    "answer": check_answer,
    "leakage": check_leakage,
    "opens_with_answer": check_opens_with_answer,
    "cue_contradiction": check_cues,
    "length": check_length,
    "duplicate": check_duplicate,
}


def run_filters(text: str, record: EmotionRecord, cues: Mapping, cfg: FilterConfig, seen: set):
    """Returns (parsed, None) when the text passes, else (parsed, (reason, detail))."""
    parsed = parse_response(text, strict=True)
    candidate = Candidate(text=text, record=record, cues=cues, parsed=parsed, seen=seen)
    for name in cfg.enabled:
        if name not in FILTERS:
            raise ValueError(f"unknown filter {name!r}; known: {', '.join(FILTERS)}")
        if name != "format" and not parsed.valid:
            break
        failure = FILTERS[name](candidate, cfg)
        if failure:
            return parsed, failure
    if not parsed.valid:
        return parsed, ("format", ",".join(parsed.errors))
    return parsed, None
