"""Reasoning quality of completions in the shared answer format (``<think>`` + ``<answer>``), without a judge:

- format validity: share of completions that parse strictly (one think block, then one known answer);
- answer-rationale consistency: share of valid completions whose rationale, read in order, names the answer as the
  last emotion it mentions (a rationale that argues for "sad" and answers "angry" is inconsistent; one that names
  no emotion does not support its answer);
- cue hallucination rate: among rationale claims about pitch, loudness and speaking rate ("the pitch is high",
  "speaks slowly") whose cue was measured for the clip, the share that contradict the measured level.
"""

import json
import re

import datasets
import evaluate
from emoreason.data.labels import EMOTIONS
from emoreason.data.labels import LabelError
from emoreason.data.labels import normalize_emotion
from emoreason.data.response_format import parse_response

_KWARGS = """
Args:
    predictions: completions (strings).
    references: reference labels (strings; unused by the scores, kept for the evaluate API).
    cues: per item, the record's measured cues (dict or JSON string), e.g. {"pitch": "high", "rate": {"word": "slow"}}.
    labels: the allowed answers (default: the whole taxonomy).
Returns:
    format_validity, consistency, cue_claims, cue_hallucination_rate (None when no claim could be checked),
    invalid_reasons: {reason: count}.
"""

_EMOTION_WORDS = sorted(set(EMOTIONS) | {"happiness", "joy", "joyful", "sadness", "anger", "fear", "afraid",
                                         "disgust", "surprise", "frustration", "excited"}, key=len, reverse=True)
_EMOTION_RE = re.compile(r"\b(" + "|".join(_EMOTION_WORDS) + r")\b", re.I)

LEVELS = {
    "low": "low", "deep": "low", "soft": "low", "quiet": "low", "slow": "low", "slowly": "low", "softly": "low",
    "quietly": "low", "weak": "low",
    "normal": "normal", "moderate": "normal", "average": "normal", "medium": "normal", "steady": "normal",
    "high": "high", "loud": "high", "loudly": "high", "fast": "high", "quick": "high", "quickly": "high",
    "rapid": "high", "rapidly": "high", "raised": "high", "elevated": "high", "strong": "high",
}
ATTRIBUTES = {
    "pitch": "pitch", "voice pitch": "pitch", "f0": "pitch",
    "volume": "energy", "loudness": "energy", "energy": "energy", "intensity": "energy",
    "speaking rate": "rate", "rate": "rate", "tempo": "rate", "pace": "rate", "speed": "rate",
}
_LEVEL = "|".join(sorted(LEVELS, key=len, reverse=True))
_ATTR = "|".join(sorted(ATTRIBUTES, key=len, reverse=True))
_HEDGE = r"(?:very |quite |rather |relatively |fairly |somewhat |a bit |slightly |clearly )?"
_CLAIM_PATTERNS = (
    re.compile(rf"\b(?P<attr>{_ATTR})\s+(?:is|was|sounds|seems|appears|remains|stays)\s+{_HEDGE}(?P<level>{_LEVEL})\b",
               re.I),
    re.compile(rf"\b{_HEDGE}(?P<level>{_LEVEL})\s+(?P<attr>{_ATTR})\b", re.I),
    re.compile(rf"\b(?:speaks|talks|speaking|talking)\s+{_HEDGE}(?P<level>{_LEVEL})\b(?P<attr>)", re.I),
    re.compile(rf"\b(?:voice|speaker)\s+(?:is|was|sounds|seems)\s+{_HEDGE}(?P<level>{_LEVEL})\b(?P<attr>)", re.I),
)
_VERB_ATTR = {"fast": "rate", "quickly": "rate", "rapidly": "rate", "slowly": "rate", "slow": "rate", "quick": "rate",
              "rapid": "rate", "loudly": "energy", "softly": "energy", "quietly": "energy", "loud": "energy",
              "soft": "energy", "quiet": "energy", "high": "pitch", "low": "pitch", "deep": "pitch"}


def rationale_claims(text):
    """[(attribute, level)] claimed by a rationale, attribute in pitch/energy/rate, level in low/normal/high."""
    claims = []
    for pattern in _CLAIM_PATTERNS:
        for match in pattern.finditer(text or ""):
            level_word = match.group("level").lower()
            attr = ATTRIBUTES.get(match.group("attr").lower()) if match.group("attr") else _VERB_ATTR.get(level_word)
            if attr:
                claims.append((attr, LEVELS[level_word]))
    return claims


def measured_level(cues, attribute):
    for key in (attribute, f"{attribute}_level", f"{attribute}_word"):
        value = cues.get(key)
        if isinstance(value, dict):
            value = value.get("word") or value.get("level")
        if isinstance(value, str) and value.strip().lower() in LEVELS:
            return LEVELS[value.strip().lower()]
    return None


def last_emotion(text):
    found = None
    for match in _EMOTION_RE.finditer(text or ""):
        try:
            found = normalize_emotion(match.group(1)) or found
        except LabelError:
            continue
    return found


class ReasoningQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Format validity, answer-rationale consistency and cue hallucination rate.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, cues=None, labels=None):
        labels = tuple(labels) if labels is not None else None
        cues = cues if cues is not None else [{}] * len(predictions)
        valid, consistent, claims, contradicted = 0, 0, 0, 0
        reasons = {}
        for text, item_cues in zip(predictions, cues):
            parsed = parse_response(text, strict=True, labels=labels)
            for reason in parsed.errors:
                reasons[reason] = reasons.get(reason, 0) + 1
            if not parsed.valid:
                continue
            valid += 1
            consistent += int(last_emotion(parsed.think) == parsed.answer)
            measured = json.loads(item_cues) if isinstance(item_cues, str) else dict(item_cues or {})
            for attribute, level in rationale_claims(parsed.think):
                truth = measured_level(measured, attribute)
                if truth is not None:
                    claims += 1
                    contradicted += int(truth != level)
        total = len(predictions)
        return {
            "format_validity": valid / total if total else 0.0,
            "consistency": consistent / valid if valid else 0.0,
            "cue_claims": claims,
            "cue_hallucination_rate": contradicted / claims if claims else None,
            "invalid_reasons": reasons,
        }
