"""The answer format every stage shares: rationales written by teachers, rewards in GRPO, metrics in evaluation.

    <think>
    ...reasoning grounded in the cues and the transcript...
    </think>
    <answer>angry</answer>
    <distribution>angry: 0.6, frustrated: 0.4</distribution>      (optional)

:func:`parse_response` never raises on model output: a malformed completion comes back with ``valid=False`` and the
reason, so callers count it as invalid instead of crashing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .labels import EMOTIONS, LabelError, normalize_emotion

THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
DIST_RE = re.compile(r"<distribution>(.*?)</distribution>", re.S)
_DIST_ITEM_RE = re.compile(r"^\s*([A-Za-z\- ]+?)\s*[:=]\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")


@dataclass
class ParsedResponse:
    text: str
    answer: str | None = None  # in the common taxonomy
    think: str | None = None
    distribution: dict[str, float] | None = None
    valid: bool = False
    errors: list[str] = field(default_factory=list)


def format_response(rationale: str, answer: str, distribution: dict[str, float] | None = None) -> str:
    """Render a training target in the canonical format."""
    text = f"<think>\n{rationale.strip()}\n</think>\n<answer>{answer}</answer>"
    if distribution:
        items = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(distribution.items(), key=lambda kv: -kv[1]) if v > 0)
        text += f"\n<distribution>{items}</distribution>"
    return text


def parse_distribution(body: str) -> dict[str, float]:
    """``"angry: 0.6, sad: 0.4"`` (or percentages) -> normalised {emotion: share}; raises ValueError if malformed."""
    shares: dict[str, float] = {}
    for item in re.split(r"[,;\n]", body):
        if not item.strip():
            continue
        match = _DIST_ITEM_RE.match(item)
        if not match:
            raise ValueError(f"cannot read distribution item {item.strip()!r}")
        emotion = normalize_emotion(match.group(1))
        value = float(match.group(2)) / (100.0 if match.group(3) else 1.0)
        shares[emotion] = shares.get(emotion, 0.0) + value
    total = sum(shares.values())
    if not shares or total <= 0:
        raise ValueError("empty distribution")
    return {k: v / total for k, v in shares.items()}


def parse_response(text: str | None, strict: bool = True, labels: tuple[str, ...] | None = None) -> ParsedResponse:
    """Parse a completion. ``strict`` requires exactly one think block before exactly one answer.

    ``labels`` restricts valid answers to a label set (e.g. the 4 classes of a suite); answers outside it are invalid.
    Non-strict parsing accepts a missing think block and, failing an answer tag, a lone emotion word at the end.
    """
    result = ParsedResponse(text=text or "")
    if not text or not text.strip():
        result.errors.append("empty")
        return result
    allowed = set(labels or EMOTIONS)
    answers = ANSWER_RE.findall(text)
    thinks = THINK_RE.findall(text)
    if len(answers) > 1:
        result.errors.append("multiple_answers")
    if not answers:
        if strict:
            result.errors.append("missing_answer")
        else:
            tail = re.findall(r"[A-Za-z]+", text)[-1:] if text else []
            answers = tail
    if strict:
        if len(thinks) != 1:
            result.errors.append("missing_think" if not thinks else "multiple_think")
        elif answers and text.find("<think>") > text.find("<answer>"):
            result.errors.append("answer_before_think")
        if thinks and not thinks[0].strip():
            result.errors.append("empty_think")
    result.think = thinks[0].strip() if thinks else None
    if answers:
        raw = answers[-1].strip()
        try:
            emotion = normalize_emotion(raw)
        except LabelError:
            emotion = None
        if emotion is None or emotion not in allowed:
            result.errors.append("unknown_emotion")
        else:
            result.answer = emotion
    dists = DIST_RE.findall(text)
    if len(dists) > 1:
        result.errors.append("multiple_distributions")
    elif dists:
        try:
            dist = parse_distribution(dists[0])
            if labels is not None and set(dist) - allowed:
                raise ValueError("emotion outside the label set")
            result.distribution = dist
        except (ValueError, LabelError):
            result.errors.append("bad_distribution")
    result.valid = not result.errors
    return result
