"""Reasoning quality of completions in the shared answer format (``<think>`` + ``<answer>``), without a judge:

- format validity: share of completions that parse strictly (one think block, then one known answer);
- answer-rationale consistency: share of valid completions whose rationale argues for the answer: the last emotion
  it states without denying it, read by :func:`emoreason.data.cues.argued_emotion` (the cue reader's clauses,
  quoting, questions and negation: "sad, not angry" argues for sad; "other" is not read as an emotion). A rationale
  that argues for "sad" and answers "angry" is inconsistent; one that names no emotion does not support its answer;
- cue hallucination rate: among rationale claims about a measured cue ("the pitch is high", "speaks slowly", "the
  pitch is not high"), the share that contradict the measured level. Claims are read and checked by
  :func:`emoreason.data.cues.ground`, the reader the datagen filter and the GRPO ``cue_grounding`` reward use, so the
  three agree on every rationale.
"""

import json

import datasets
import evaluate
from emoreason.data.cues import argued_emotion
from emoreason.data.cues import ground
from emoreason.data.response_format import parse_response

_KWARGS = """
Args:
    predictions: completions (strings).
    references: reference labels (strings; unused by the scores, kept for the evaluate API).
    cues: per item, the record's measured cues (dict or JSON string), e.g. {"pitch_level": "high"}; short names and
        word objects are read too: {"pitch": "high", "rate": {"word": "slow"}}.
    labels: the allowed answers (default: the whole taxonomy).
Returns:
    format_validity, consistency, cue_claims, cue_hallucination_rate (None when no claim could be checked),
    invalid_reasons: {reason: count}.
"""

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
            consistent += int(argued_emotion(parsed.think) == parsed.answer)
            measured = json.loads(item_cues) if isinstance(item_cues, str) else dict(item_cues or {})
            checked = ground(parsed.think, measured)
            claims += checked.checked
            contradicted += len(checked.contradicted)
        total = len(predictions)
        return {
            "format_validity": valid / total if total else 0.0,
            "consistency": consistent / valid if valid else 0.0,
            "cue_claims": claims,
            "cue_hallucination_rate": contradicted / claims if claims else None,
            "invalid_reasons": reasons,
        }
