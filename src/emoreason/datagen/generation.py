"""The generation pass: a shard of records -> teacher rationales -> filters -> kept records and their DPO pairs."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..data.labels import entropy, multi_label
from ..data.response_format import parse_response
from ..data.schema import EmotionRecord
from .acoustic import Calibration
from .config import DatagenConfig, resolve_input
from .faults import KillHook
from .filters import run_filters, think_hash
from .pairs import pair_lines, pair_requests
from .seed import PromptTemplate, SeedDescription, answer_format, load_pool, pick
from .teachers import TeacherFailure, TeacherRequest


@dataclass
class Generator:
    """Writes a generation shard: seed descriptions, one teacher call for the shard's rationales, the filters, then
    one teacher call for the kept records' pair negatives. The executors call :meth:`shard`."""

    cfg: DatagenConfig
    calibration: Calibration
    acoustic: dict[str, dict]
    teacher: Any
    label_space: list[str]
    seen: set = field(default_factory=set)

    def __post_init__(self):
        self.prompt = PromptTemplate.load(resolve_input(self.cfg.prompt.template, self.cfg))
        self.spurious_prompt = PromptTemplate.load(resolve_input(self.cfg.prompt.spurious_template, self.cfg))
        self.pool = load_pool(resolve_input(self.cfg.prompt.instructions, self.cfg))
        self.hook = KillHook("generate")

    def provenance(self, sample: int) -> dict:
        return {"teacher": self.teacher.name, "model": self.teacher.model_id,
                "backend": getattr(self.teacher, "backend", None), "prompt_id": self.prompt.prompt_id,
                "seed": self.cfg.seed, "sample": sample, "emoreason": __version__}

    def soft_label(self, record: EmotionRecord) -> dict:
        """Ambiguity (entropy, bits) and the 1/C multi-label target over the corpus's label space."""
        return {"entropy": round(entropy(record.distribution), 4),
                "multi_label": multi_label(record.distribution, num_classes=len(self.label_space)),
                "num_classes": len(self.label_space)}

    def record_seed(self, record_id: str) -> int:
        return int(hashlib.sha1(f"{self.cfg.seed}:{record_id}".encode()).hexdigest()[:8], 16)

    def shard(self, records: list[EmotionRecord]) -> dict[str, list[dict]]:
        """The shard's rows by output file: records, rejected, pairs, errors, dropped, teacher_chats."""
        out = {"records": [], "rejected": [], "pairs": [], "errors": [], "dropped": [], "teacher_chats": []}
        prepared, requests = [], []
        for record in records:
            analysis = self.acoustic.get(record.id) or {"reason": "no acoustic analysis"}
            if "features" not in analysis:
                out["errors"].append({"id": record.id, "audio": record.audio, "reason": analysis["reason"]})
                self.hook.tick()
                continue
            cues = self.calibration.describe(analysis["features"], record.corpus, record.gender)
            sources = cues.pop("calibration")
            description = SeedDescription.from_record(record, cues)
            target = record.label or (description.annotators[0][0] if description.annotators else None)
            if target is None:
                drop_record(out, record.id, "no_label", "no label and no votes")
                self.hook.tick()
                continue
            distribution = {k: v for k, v in record.distribution.items() if v > 0} if (
                self.cfg.prompt.with_distribution) else None
            instruction = pick(self.pool, record.id, self.cfg.seed)
            prompt = self.prompt.render(description=description.render(), instruction=instruction, target=target,
                                        format=answer_format(target, distribution or None))
            requests.append(TeacherRequest(record.id, prompt, self.cfg.teacher.num_samples,
                                           self.record_seed(record.id), description, target, distribution or None))
            prepared.append((record, cues, sources, description, target, instruction, prompt))

        samples = self.teacher.generate(requests)
        kept = []
        for (record, cues, sources, description, target, instruction, prompt), texts in zip(prepared, samples):
            if isinstance(texts, TeacherFailure):
                drop_record(out, record.id, "teacher_error", texts.reason)
                self.hook.tick()
                continue
            local_seen = self.seen if self.cfg.dedup_scope == "run" else set()
            accepted, rejections = None, []
            for index, text in enumerate(texts):
                if accepted is not None:
                    break
                parsed, failure = run_filters(text, record, cues, self.cfg.filters, local_seen)
                if failure:
                    rejections.append({"id": record.id, "sample": index, "reason": failure[0], "detail": failure[1],
                                       "text": text})
                    continue
                accepted = (index, text)
                local_seen.add(think_hash(parsed.think or ""))
            outcome = "kept_other_sample" if accepted else "dropped"
            out["rejected"].extend({**r, "outcome": outcome} for r in rejections)
            if accepted is None:
                out["dropped"].append({"id": record.id, "reason": rejections[-1]["reason"] if rejections
                                       else "no_samples", "detail": f"{len(texts)} samples rejected"})
            else:
                index, text = accepted
                kept_record = dataclasses.replace(
                    record, cues=cues, task=self.cfg.task, instruction=instruction, response=text,
                    meta={**record.meta, "provenance": self.provenance(index), "cue_calibration": sources,
                          "samples": len(texts), "rejected_samples": len(rejections),
                          "soft_label": self.soft_label(record)})
                out["records"].append(kept_record.to_dict())
                out["teacher_chats"].append(teacher_chat(record, prompt, text))
                kept.append((kept_record, description, target, instruction))
            self.hook.tick()

        if self.cfg.pairs.enabled and kept:
            out["pairs"] = self.pairs(kept, out["rejected"])
        return out

    def pairs(self, kept, rejected: list[dict]) -> list[dict]:
        """DPO lines for the kept records; a negative whose teacher request failed is listed in ``rejected``."""
        jobs = []
        for record, description, target, instruction in kept:
            for job in pair_requests(record, description, target, instruction, self.prompt, self.spurious_prompt,
                                     self.label_space, self.cfg.pairs.kinds, self.record_seed(record.id)):
                jobs.append((record, job))
        outputs = self.teacher.generate([job.request for _, job in jobs])
        return pair_lines([record for record, *_ in kept], jobs, outputs, rejected)

    def without_teacher(self) -> Generator:
        """A copy without its teacher (a client or an engine does not travel to a Ray actor; each actor makes its
        own) and without this process's kill hook."""
        clone = copy.copy(self)
        clone.teacher = None
        clone.hook = None
        return clone

    def remember_kept(self, response: str) -> None:
        """Count a kept rationale of an earlier start as seen (``dedup_scope: run``), read as the filters read it."""
        self.seen.add(think_hash(parse_response(response, strict=True).think or ""))


def drop_record(out: dict[str, list[dict]], record_id: str, reason: str, detail: str) -> None:
    """A record dropped before any sample was judged: a row in the shard's dropped.jsonl and one in rejected.jsonl."""
    dropped = {"id": record_id, "reason": reason, "detail": detail}
    out["dropped"].append(dropped)
    out["rejected"].append({**dropped, "sample": None, "text": None, "outcome": "dropped"})


def teacher_chat(record: EmotionRecord, prompt: str, response: str) -> dict:
    """One line of ``teacher_chats.jsonl``: the teacher's prompt and its kept answer as a chat, with the record's id
    and split. It is what distilling a teacher takes (the demo warms its backbone up on the train split's lines)."""
    return {"id": record.id, "split": record.split,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def select_for_generation(records: list[EmotionRecord], cfg: DatagenConfig) -> list[EmotionRecord]:
    """The records the run writes rationales for: those of ``splits``, then a stable subset of ``limit``."""
    chosen = [r for r in records if not cfg.splits or r.split in cfg.splits]
    if cfg.limit is not None and cfg.limit < len(chosen):
        # A stable pseudo-random subset (spread over speakers and emotions), not the first N ids.
        chosen = sorted(chosen, key=lambda r: hashlib.sha1(f"{cfg.seed}:{r.id}".encode()).hexdigest())[: cfg.limit]
        chosen.sort(key=lambda r: r.id)
    return chosen
