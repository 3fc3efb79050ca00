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

import math
import re
from dataclasses import dataclass, field

from .labels import EMOTIONS, LabelError, normalize_emotion

# Items of a <distribution>: "emotion: share" (or "="), share a plain decimal or a percentage. Both patterns are
# unambiguous (no nested or overlapping repeats), so matching stays linear in the item's length.
_DIST_NAME_RE = re.compile(r"[A-Za-z][A-Za-z\- ]*")
_DIST_VALUE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(%?)")


def tag_blocks(text: str, name: str) -> list[tuple[int, int, str]]:
    """``<name>...</name>`` blocks as (start, end, body), left to right, each opening tag closed by the next closing
    tag (what a non-greedy regex finds), in time linear in ``len(text)``: once an opening tag has no closing tag
    after it, no later one can have one either, so the scan stops instead of retrying from every later tag."""
    opening, closing = f"<{name}>", f"</{name}>"
    blocks, pos = [], 0
    while True:
        start = text.find(opening, pos)
        if start < 0:
            return blocks
        close = text.find(closing, start + len(opening))
        if close < 0:
            return blocks
        blocks.append((start, close + len(closing), text[start + len(opening):close]))
        pos = close + len(closing)


def _think_spans(text: str, thinks: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """Closed think blocks, plus an opened-but-never-closed one (running to the end of the text)."""
    spans = [(start, end) for start, end, _ in thinks]
    dangling = text.find("<think>", spans[-1][1] if spans else 0)
    if dangling >= 0:
        spans.append((dangling, len(text)))
    return spans


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
    """``"angry: 0.6, sad: 0.4"`` (or percentages) -> normalised {emotion: share}; raises ValueError if malformed
    (an unreadable item, an unknown emotion, a share that is not a finite number, or shares summing to zero)."""
    shares: dict[str, float] = {}
    for item in re.split(r"[,;\n]", body):
        if not item.strip():
            continue
        cut = min((i for i in (item.find(":"), item.find("=")) if i >= 0), default=-1)
        name, value = (item[:cut].strip(), item[cut + 1:].strip()) if cut >= 0 else ("", "")
        number = _DIST_VALUE_RE.fullmatch(value)
        if not _DIST_NAME_RE.fullmatch(name) or not number:
            raise ValueError(f"cannot read distribution item {item.strip()[:80]!r}")
        emotion = normalize_emotion(name)
        share = float(number.group(1)) / (100.0 if number.group(2) else 1.0)
        shares[emotion] = shares.get(emotion, 0.0) + share
    total = sum(shares.values())
    if not shares or total <= 0:
        raise ValueError("empty distribution")
    if not math.isfinite(total):  # e.g. a 400-digit share: float('inf'), and inf / inf is NaN
        raise ValueError("distribution shares are not finite numbers")
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
    answer_blocks = tag_blocks(text, "answer")
    thinks = tag_blocks(text, "think")
    answers = [body for _, _, body in answer_blocks]
    if len(answers) > 1:
        result.errors.append("multiple_answers")
    # An answer tag inside the reasoning is a thought, not the answer (and a second answer in disguise).
    spans = _think_spans(text, thinks)
    if any(lo < start < hi for start, _, _ in answer_blocks for lo, hi in spans):
        result.errors.append("answer_inside_think")
    if not answers:
        if strict:
            result.errors.append("missing_answer")
        else:
            answers = re.findall(r"[A-Za-z]+", text)[-1:]
    if strict:
        if len(thinks) != 1:
            result.errors.append("missing_think" if not thinks else "multiple_think")
        elif answer_blocks and thinks[0][0] > answer_blocks[0][0]:
            result.errors.append("answer_before_think")
        if thinks and not thinks[0][2].strip():
            result.errors.append("empty_think")
    result.think = thinks[0][2].strip() if thinks else None
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
    dists = tag_blocks(text, "distribution")
    if len(dists) > 1:
        result.errors.append("multiple_distributions")
    elif dists:
        try:
            dist = parse_distribution(dists[0][2])
            if labels is not None and set(dist) - allowed:
                raise ValueError("emotion outside the label set")
            result.distribution = dist
        except (ValueError, LabelError):
            result.errors.append("bad_distribution")
    result.valid = not result.errors
    return result


# Errors that cost a completion its stated distribution only; any other error costs the answer too.
DISTRIBUTION_ERRORS = frozenset({"bad_distribution", "multiple_distributions"})
ANSWER_STYLES = ("direct", "cot")


def parse_answer(text: str | None, style: str, labels: tuple[str, ...] | None = None) -> ParsedResponse:
    """Parse a completion against the format its prompt style asked for; ``valid`` means "answered in that format".

    - ``cot`` (reason, then answer): the strict format; a format error voids the answer (a broken ``<distribution>``
      voids only the distribution, but the completion is still not in the asked format).
    - ``direct`` (the label only): exactly one ``<answer>`` tag, or a bare one-word label; an answer tag inside a
      ``<think>`` block, several answer tags, or a sentence without a tag are invalid.
    """
    if style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer style {style!r}; known: {ANSWER_STYLES}")
    parsed = parse_response(text, strict=style == "cot", labels=labels)
    if style == "direct" and parsed.answer is not None and not tag_blocks(text or "", "answer") \
            and len((text or "").split()) > 1:
        parsed.errors.append("missing_answer")
        parsed.valid = False
    if set(parsed.errors) - DISTRIBUTION_ERRORS:
        parsed.answer = None
        parsed.distribution = None
    return parsed
