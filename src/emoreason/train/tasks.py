"""Multitask SFT: the task registry, the examples each task derives from records, and the task-alternating sampler.

One labelled clip feeds several tasks. Each task turns an :class:`~emoreason.data.schema.EmotionRecord` into an
(instruction, response) pair, or skips the record when it lacks what the task needs (a transcript, a rationale, a
measured cue):

=====================  ===========================================================  ==============================
task                   target                                                       needs
=====================  ===========================================================  ==============================
``emotion_reasoning``  the record's rationale + answer (``record.response``)        a response (from ``datagen``)
``emotion_label``      ``<answer>label</answer>``                                   a label
``transcription``      the transcript                                               a transcript
``prosody``            the level word of one attribute (pitch, energy or rate)      that cue in ``record.cues``
``captioning``         one sentence describing speaker, voice and emotion           a label
=====================  ===========================================================  ==============================

A recipe lists the tasks it trains with, each with a weight, an optional records file of its own and an optional
instruction pool (default: :data:`emoreason.data.conversation.INSTRUCTION_POOLS`). :class:`TaskAlternatingSampler`
then orders the examples so that every batch holds one task, alternating on a schedule (``round_robin``: a fixed
interleave in proportion to the weights; ``weighted``: each batch's task drawn at random with those weights), and,
within a task, clips of similar duration share a batch.

The dataset rows built here (:func:`build_task_examples`) are what :class:`emoreason.train.collators.SFTCollator`
consumes. GRPO builds its prompts from the records itself (``train.grpo``: the conversation of
:mod:`emoreason.data.conversation` with the clip as an audio part) and DPO reads preference pairs (``train.dpo``).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Sampler

from ..data.conversation import INSTRUCTION_POOLS, choose_instruction
from ..data.cues import CUES, PROSODY_CUES, measured_value
from ..data.schema import EmotionRecord, read_records

logger = logging.getLogger(__name__)

PROSODY_ATTRIBUTES = tuple(CUES[key].name for key in PROSODY_CUES)  # pitch, energy, rate
_CUE_NOUNS = {CUES[key].name: CUES[key].noun for key in PROSODY_CUES}
_CUE_KEYS = {CUES[key].name: key for key in PROSODY_CUES}


def cue_word(record: EmotionRecord, attribute: str) -> str | None:
    """The level word the acoustic analysis wrote for ``attribute`` (pitch / energy / rate), if any: read by
    :func:`emoreason.data.cues.measured_value` (``cues["pitch_level"]``, ``cues["pitch"]``, a ``{"word": ...}``)."""
    return measured_value(record.cues, _CUE_KEYS[attribute])


# -- task registry ---------------------------------------------------------------------------------------------
TargetBuilder = Callable[[EmotionRecord, random.Random], "tuple[str, str] | None"]
"""record, rng -> (instruction pool key, response), or None when the record cannot serve the task."""


def _emotion_reasoning(record: EmotionRecord, rng: random.Random):
    if not record.response or record.task not in (None, "emotion_reasoning"):
        return None
    return "emotion_reasoning", record.response


def label_only_response(label: str) -> str:
    """The ``emotion_label`` target; scorers compare the likelihoods of these strings across labels."""
    return f"<answer>{label}</answer>"


def _emotion_label(record: EmotionRecord, rng: random.Random):
    if not record.label:
        return None
    return "emotion_label", label_only_response(record.label)


def _transcription(record: EmotionRecord, rng: random.Random):
    if not record.transcript:
        return None
    return "transcription", record.transcript.strip()


def _prosody(record: EmotionRecord, rng: random.Random):
    available = [a for a in PROSODY_ATTRIBUTES if cue_word(record, a)]
    if not available:
        return None
    attribute = rng.choice(available)
    return f"prosody.{attribute}", cue_word(record, attribute)


def _captioning(record: EmotionRecord, rng: random.Random):
    if not record.label:
        return None
    who = f"A {record.gender} speaker" if record.gender else "A speaker"
    said = f' says "{record.transcript.strip()}"' if record.transcript else " speaks"
    cues = [f"{cue_word(record, a)} {_CUE_NOUNS[a]}" for a in PROSODY_ATTRIBUTES if cue_word(record, a)]
    how = f", with {', '.join(cues[:-1]) + ' and ' + cues[-1] if len(cues) > 1 else cues[0]}" if cues else ""
    article = "an" if record.label[0] in "aeiou" else "a"
    return "captioning", f"{who}{said} in {article} {record.label} tone{how}."


TASKS: dict[str, TargetBuilder] = {
    "emotion_reasoning": _emotion_reasoning,
    "emotion_label": _emotion_label,
    "transcription": _transcription,
    "prosody": _prosody,
    "captioning": _captioning,
}


@dataclass
class TaskSpec:
    """One task of a recipe: its name (a key of :data:`TASKS`), weight, optional own records and instruction pool."""

    name: str
    weight: float = 1.0
    records: str | None = None  # default: the recipe's train_records
    instructions: list[str] | dict[str, list[str]] | None = None  # a list, or {pool key: list} (prosody.pitch ...)
    max_examples: int | None = None

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"tasks: unknown task {self.name!r}; known tasks: {sorted(TASKS)}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"tasks: weight of {self.name!r} must be a positive number, got {self.weight!r}")

    def pool(self, key: str) -> Sequence[str]:
        if isinstance(self.instructions, Mapping):
            return self.instructions.get(key) or INSTRUCTION_POOLS[key]
        return self.instructions or INSTRUCTION_POOLS[key]


def parse_task_specs(tasks: Any) -> list[TaskSpec]:
    """A recipe's ``tasks`` field -> specs. Accepts ``{name: {weight: .., records: .., instructions: ..}}``,
    a list of such objects with a ``name`` key, a JSON string of either (command-line override), a comma list
    ``"emotion_label:2,transcription"`` or a path to a YAML/JSON file holding any of these."""
    if tasks is None or tasks == "":
        return [TaskSpec("emotion_reasoning")]
    if isinstance(tasks, str):
        text = tasks.strip()
        if text.startswith(("{", "[")):
            tasks = json.loads(text)
        elif text.endswith((".yaml", ".yml", ".json")):
            import yaml

            tasks = yaml.safe_load(Path(text).read_text())
        else:
            parsed = {}
            for item in filter(None, (t.strip() for t in text.split(","))):
                name, _, weight = item.partition(":")
                parsed[name.strip()] = {"weight": float(weight)} if weight else {}
            tasks = parsed
    if isinstance(tasks, Mapping):
        tasks = [{"name": name, **(opts or {})} for name, opts in tasks.items()]
    specs = []
    for item in tasks:
        if isinstance(item, str):
            item = {"name": item}
        unknown = set(item) - {"name", "weight", "records", "instructions", "max_examples"}
        if unknown:
            raise ValueError(f"tasks: unknown key(s) {sorted(unknown)} for task {item.get('name')!r}")
        specs.append(TaskSpec(**item))
    if not specs:
        raise ValueError("tasks: the recipe lists no task")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("tasks: a task is listed twice")
    return specs


# -- dataset rows ----------------------------------------------------------------------------------------------
def example_from_record(record: EmotionRecord, task: str, instruction: str, response: str) -> dict[str, Any]:
    """The dataset row the collators read (one clip, its dialogue context, one instruction, one target); the
    collator turns it into the conversation with :func:`emoreason.data.conversation.build_conversation`."""
    return {
        "id": f"{record.id}:{task}",
        "clip_id": record.id,
        "audio": record.audio,
        "duration": float(record.duration),
        "task": task,
        "context": list(record.context),
        "instruction": instruction,
        "response": response,
        "label": record.label or "",
    }


def build_task_examples(
    specs: Sequence[TaskSpec],
    default_records: str | Path | Sequence[EmotionRecord],
    split: str | None = "train",
    seed: int = 0,
    max_records: int | None = None,
) -> list[dict[str, Any]]:
    """Derive every task's rows from the records (a task's own ``records`` file, or ``default_records``).

    ``split`` keeps only records of that split (None: all). Instructions come from
    :func:`emoreason.data.conversation.choose_instruction`: a record's own instruction for the task (written by
    ``datagen``), else one drawn from the task's pool with a seeded generator, so the same recipe yields the same rows.
    """
    cache: dict[str, list[EmotionRecord]] = {}

    def load(source) -> list[EmotionRecord]:
        if not isinstance(source, (str, Path)):
            return list(source)
        key = str(source)
        if key not in cache:
            cache[key] = read_records(source)
        return cache[key]

    rows: list[dict[str, Any]] = []
    for spec in specs:
        rng = random.Random(f"{seed}:{spec.name}")
        records = [r for r in load(spec.records or default_records) if split is None or r.split == split]
        if max_records is not None:
            records = records[:max_records]
        task_rows = []
        for record in records:
            built = TASKS[spec.name](record, rng)
            if built is None:
                continue
            pool_key, response = built
            instruction = choose_instruction(record, spec.name, spec.pool(pool_key), rng)
            task_rows.append(example_from_record(record, spec.name, instruction, response))
        if spec.max_examples is not None:
            task_rows = task_rows[: spec.max_examples]
        if not task_rows:
            source = spec.records or default_records
            where = source if isinstance(source, (str, Path)) else f"{len(load(source))} records given in memory"
            raise ValueError(
                f"task {spec.name!r} found no usable record in {where} ({len(records)} of split {split!r}); "
                "see the task table in emoreason.train.tasks for what each task needs"
            )
        logger.info("task %s: %d examples", spec.name, len(task_rows))
        rows.extend(task_rows)
    return rows


# -- sampler ---------------------------------------------------------------------------------------------------
SCHEDULES = ("round_robin", "weighted")


class TaskAlternatingSampler(Sampler[int]):
    """Indices in an order where each consecutive block of ``batch_size`` holds one task.

    The DataLoader cuts the stream into batches of ``batch_size``, so every batch is single-task. Under data
    parallelism accelerate deals batches to ranks in turn; ``blocks_per_step`` (the number of ranks) repeats each
    scheduled task that many times so that all ranks train the same task at the same step.

    Within a task, indices are shuffled, grouped into mega-batches of ``length_group_size`` batches and sorted by
    ``lengths`` (clip duration) there, so a batch holds clips of similar duration (little padding) while batches stay
    random. A task that runs out of batches starts a freshly shuffled pass. An epoch has as many batches as all tasks
    together fill.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        batch_size: int,
        weights: Mapping[str, float] | None = None,
        schedule: str = "round_robin",
        lengths: Sequence[float] | None = None,
        length_group_size: int = 16,
        blocks_per_step: int = 1,
        seed: int = 0,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"task_schedule must be one of {SCHEDULES}, got {schedule!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self.schedule = schedule
        self.lengths = list(lengths) if lengths is not None else None
        self.length_group_size = max(1, length_group_size)
        self.blocks_per_step = max(1, blocks_per_step)
        self.seed = seed
        self.epoch = 0
        self.indices_of: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            self.indices_of.setdefault(task, []).append(i)
        self.task_names = list(self.indices_of)
        weights = dict(weights or {})
        unknown = set(weights) - set(self.task_names)
        if unknown:
            raise ValueError(f"weights name tasks with no examples: {sorted(unknown)}")
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.task_names}
        blocks = sum(math.ceil(len(ix) / batch_size) for ix in self.indices_of.values())
        self.num_steps = max(1, math.ceil(blocks / self.blocks_per_step))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_steps * self.blocks_per_step * self.batch_size

    def task_schedule(self) -> list[str]:
        """The task of each step of this epoch (each step = ``blocks_per_step`` batches)."""
        if self.schedule == "weighted":
            rng = random.Random(f"{self.seed}:{self.epoch}:schedule")
            names = self.task_names
            return rng.choices(names, weights=[self.weights[t] for t in names], k=self.num_steps)
        # Smooth weighted round robin: deterministic, each task's share of steps follows its weight, never bursty.
        credit = dict.fromkeys(self.task_names, 0.0)
        total = sum(self.weights.values())
        order = []
        for _ in range(self.num_steps):
            for t in self.task_names:
                credit[t] += self.weights[t]
            pick = max(self.task_names, key=lambda t: credit[t])
            credit[pick] -= total
            order.append(pick)
        return order

    def _blocks(self, task: str, rng: random.Random) -> Iterator[list[int]]:
        """Endless single-task blocks of ``batch_size`` indices, length-grouped, one shuffled pass after another."""
        pool = self.indices_of[task]
        while True:
            order = list(pool)
            rng.shuffle(order)
            if self.lengths is not None:
                mega = self.batch_size * self.length_group_size
                order = [i for s in range(0, len(order), mega)
                         for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])]
            blocks = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
            # A short last block is topped up from the pool so that batches never mix tasks.
            if len(blocks[-1]) < self.batch_size:
                blocks[-1] = (blocks[-1] + [rng.choice(pool) for _ in range(self.batch_size)])[: self.batch_size]
            rng.shuffle(blocks)
            yield from blocks

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        streams = {t: self._blocks(t, rng) for t in self.task_names}
        for task in self.task_schedule():
            for _ in range(self.blocks_per_step):
                yield from next(streams[task])


def batch_tasks(sampler: TaskAlternatingSampler, tasks: Sequence[str]) -> list[set[str]]:
    """The set of tasks in each batch the sampler yields (tests and docs use it to check the schedule)."""
    order = list(sampler)
    return [{tasks[i] for i in order[s : s + sampler.batch_size]} for s in range(0, len(order), sampler.batch_size)]

