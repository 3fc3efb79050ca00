"""DPO preference pairs: the accepted (grounded) rationale against rationales the teacher writes from perturbed
seed descriptions. Each rejected response records its kind:

* ``hallucinated_cue``: one measured cue flipped (e.g. pitch high -> low); the rationale must actually state the
  false cue (checked against the measurement), else it is no use as a negative and is dropped;
* ``wrong_emotion``: the teacher argues for an emotion no rater chose (the annotator line is withheld);
* ``spurious_cue``: the right answer argued from a real but emotion-irrelevant detail (clip length, gender...).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass

from ..data.cues import contradictions
from ..data.response_format import parse_response
from ..data.schema import EmotionRecord
from .filters import allowed_answers, normalise
from .seed import PromptTemplate, SeedDescription, answer_format, hallucinate_cue, spurious_detail
from .teachers import TeacherFailure, TeacherRequest

PAIR_KINDS = ("hallucinated_cue", "wrong_emotion", "spurious_cue")


@dataclass
class PairRequest:
    kind: str
    request: TeacherRequest
    detail: str


def pair_requests(
    record: EmotionRecord,
    description: SeedDescription,
    target: str,
    instruction: str,
    rationale_prompt: PromptTemplate,
    spurious_prompt: PromptTemplate,
    label_space: list[str],
    kinds: list[str],
    seed: int,
) -> list[PairRequest]:
    rng = random.Random(f"{seed}:{record.id}:pairs")
    out: list[PairRequest] = []
    for kind in kinds:
        key = f"{record.id}:{kind}"
        if kind == "hallucinated_cue":
            flipped = hallucinate_cue(description, rng)
            if flipped is None:
                continue
            desc, cue, value = flipped
            prompt = rationale_prompt.render(description=desc.render(), instruction=instruction, target=target,
                                             format=answer_format(target, None))
            out.append(PairRequest(kind, TeacherRequest(key, prompt, 1, seed, desc, target), f"{cue}={value}"))
        elif kind == "wrong_emotion":
            voted = allowed_answers(record, "votes")
            options = [e for e in label_space if e not in voted]
            if not options:
                continue
            wrong = rng.choice(sorted(options))
            prompt = rationale_prompt.render(description=description.render(annotators=False),
                                             instruction=instruction, target=wrong, format=answer_format(wrong, None))
            out.append(PairRequest(kind, TeacherRequest(key, prompt, 1, seed, description, wrong), wrong))
        elif kind == "spurious_cue":
            detail = spurious_detail(description, rng)
            desc = description.with_extra(detail)
            phrase = detail.lower().replace(": ", " of ")
            prompt = spurious_prompt.render(description=desc.render(annotators=False), instruction=instruction,
                                            target=target, spurious=phrase, format=answer_format(target, None))
            out.append(PairRequest(kind, TeacherRequest(key, prompt, 1, seed, desc, target, kind="spurious",
                                                        spurious=phrase), detail))
        else:
            raise ValueError(f"unknown pair kind {kind!r}; known: {', '.join(PAIR_KINDS)}")
    return out


def accept_rejected(kind: str, text: str, chosen: str, record: EmotionRecord, cues: Mapping) -> str | None:
    """Why a generated negative is unusable (None when it is a proper negative of its kind)."""
    parsed = parse_response(text, strict=True)
    if not parsed.valid:
        return "format:" + ",".join(parsed.errors)
    if kind == "hallucinated_cue" and not contradictions(parsed.think or "", cues):
        return "states_no_false_cue"
    if kind == "wrong_emotion" and parsed.answer in allowed_answers(record, "votes"):
        return "answer_was_voted"
    if kind == "spurious_cue" and parsed.answer not in allowed_answers(record, "votes"):
        return "answer_not_voted"
    if normalise(text) == normalise(chosen):
        return "same_as_chosen"
    return None


def pair_lines(kept: list[EmotionRecord], jobs: list[tuple[EmotionRecord, PairRequest]],
               outputs: list[list[str] | TeacherFailure], rejected: list[dict]) -> list[dict]:
    """DPO lines for the kept records from the teacher's ``outputs`` for their pair ``jobs``: a record with at least
    one usable negative gets a line (``meta["rejected"]``; the unusable ones in ``meta["unusable_negatives"]``). A
    negative whose teacher request failed is also listed in ``rejected``."""
    rejected_by_record: dict[str, list[dict]] = {}
    failures: dict[str, list[dict]] = {}
    for (record, job), answer in zip(jobs, outputs):
        entry = {"text": None, "kind": job.kind, "detail": job.detail}
        if isinstance(answer, TeacherFailure):
            failures.setdefault(record.id, []).append({**entry, "unusable": f"teacher_error: {answer.reason}"})
            rejected.append({"id": record.id, "sample": None, "reason": "teacher_error", "detail": answer.reason,
                             "text": None, "outcome": f"no_{job.kind}_negative"})
            continue
        text = answer[0] if answer else ""
        problem = accept_rejected(job.kind, text, record.response or "", record, record.cues)
        entry["text"] = text
        if problem:
            failures.setdefault(record.id, []).append({**entry, "unusable": problem})
        else:
            rejected_by_record.setdefault(record.id, []).append(entry)
    lines = []
    for record in kept:
        if record.id in rejected_by_record:
            meta = {**record.meta, "rejected": rejected_by_record[record.id]}
            if record.id in failures:
                meta["unusable_negatives"] = failures[record.id]
            lines.append(dataclasses.replace(record, meta=meta).to_dict())
    return lines
