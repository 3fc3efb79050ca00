"""Multitask SFT: task derivation from records, recipe task specs, and the task-alternating sampler's schedule."""

from __future__ import annotations

from collections import Counter

import pytest

from emoreason.data.schema import EmotionRecord
from emoreason.train.tasks import (
    TaskAlternatingSampler,
    batch_tasks,
    build_task_examples,
    parse_task_specs,
)


def _record(i: int, **kw) -> EmotionRecord:
    base = dict(id=f"r{i}", audio=f"wav/r{i}.wav", duration=1.0 + i % 5, corpus="t", split="train", label="happy",
                transcript="The train leaves in ten minutes.", gender="female")
    return EmotionRecord(**{**base, **kw})


def test_tasks_derive_from_the_same_records_and_skip_what_they_cannot_serve():
    records = [_record(0, cues={"pitch": {"word": "high"}, "rate": "fast"}), _record(1, transcript=None),
               _record(2, response="<think>\nbright and quick\n</think>\n<answer>happy</answer>")]
    specs = parse_task_specs(["emotion_reasoning", "emotion_label", "transcription", "prosody", "captioning"])
    rows = build_task_examples(specs, records)
    by_task = Counter(r["task"] for r in rows)
    assert by_task == {"emotion_reasoning": 1, "emotion_label": 3, "transcription": 2, "prosody": 1, "captioning": 3}
    prosody = next(r for r in rows if r["task"] == "prosody")
    assert prosody["response"] in ("high", "fast")
    caption = next(r for r in rows if r["task"] == "captioning" and r["clip_id"] == "r0")
    assert "female" in caption["response"] and "high pitch" in caption["response"] and "happy" in caption["response"]
    assert next(r for r in rows if r["task"] == "emotion_label")["response"] == "<answer>happy</answer>"
    # the same recipe gives the same rows (instructions drawn with a seeded generator)
    assert rows == build_task_examples(specs, records)


def test_task_specs_from_yaml_json_and_shorthand():
    from_yaml = parse_task_specs({"emotion_label": {"weight": 2}, "transcription": None})
    assert [(s.name, s.weight) for s in from_yaml] == [("emotion_label", 2.0), ("transcription", 1.0)]
    assert [(s.name, s.weight) for s in parse_task_specs("emotion_label:3,captioning")] == [
        ("emotion_label", 3.0), ("captioning", 1.0)]
    assert parse_task_specs('{"prosody": {"instructions": ["How is the pitch?"]}}')[0].pool("prosody.pitch") == [
        "How is the pitch?"]
    with pytest.raises(ValueError, match="unknown task"):
        parse_task_specs("emotion_labels")
    with pytest.raises(ValueError, match="weight"):
        parse_task_specs({"emotion_label": {"weight": 0}})
    with pytest.raises(ValueError, match="unknown key"):
        parse_task_specs({"emotion_label": {"wieght": 1}})


def test_a_task_without_usable_records_is_an_error_naming_it():
    with pytest.raises(ValueError, match="prosody") as error:
        build_task_examples(parse_task_specs("prosody"), [_record(i) for i in range(50)])
    # the message names where the records came from, without dumping them
    assert "50 records given in memory" in str(error.value) and "EmotionRecord(" not in str(error.value)


def _tasks(counts: dict[str, int]) -> list[str]:
    return [t for t, n in counts.items() for _ in range(n)]


def test_round_robin_alternates_one_task_per_batch_in_proportion_to_weights():
    tasks = _tasks({"a": 40, "b": 20, "c": 20})
    sampler = TaskAlternatingSampler(tasks, batch_size=4, weights={"a": 2, "b": 1, "c": 1})
    batches = batch_tasks(sampler, tasks)
    assert all(len(b) == 1 for b in batches)  # never two tasks in one batch
    sequence = [next(iter(b)) for b in batches]
    assert len(sequence) == 20  # 10 + 5 + 5 batches of 4
    assert sequence[:8] == ["a", "b", "c", "a", "a", "b", "c", "a"]  # smooth weighted round robin
    assert Counter(sequence) == {"a": 10, "b": 5, "c": 5}
    assert sequence == sampler.task_schedule()
    # every example of each task is seen once per epoch when the schedule matches the sizes
    assert sorted(list(sampler)) == list(range(len(tasks)))


def test_equal_weights_alternate_strictly_and_epochs_reshuffle():
    tasks = _tasks({"x": 16, "y": 16})
    sampler = TaskAlternatingSampler(tasks, batch_size=4)
    assert [next(iter(b)) for b in batch_tasks(sampler, tasks)] == ["x", "y"] * 4
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(first) == sorted(sampler)


def test_weighted_schedule_draws_tasks_with_the_weights():
    tasks = _tasks({"a": 400, "b": 400})
    sampler = TaskAlternatingSampler(tasks, batch_size=2, weights={"a": 3, "b": 1}, schedule="weighted", seed=1)
    sequence = sampler.task_schedule()
    assert len(sequence) == 400
    assert 0.68 < sequence.count("a") / len(sequence) < 0.82
    assert sequence == TaskAlternatingSampler(tasks, 2, {"a": 3, "b": 1}, "weighted", seed=1).task_schedule()


def test_blocks_per_step_keeps_all_ranks_on_one_task():
    tasks = _tasks({"a": 16, "b": 16})
    sampler = TaskAlternatingSampler(tasks, batch_size=2, blocks_per_step=2)
    sequence = [next(iter(b)) for b in batch_tasks(sampler, tasks)]
    # accelerate deals batch k to rank k % 2: consecutive pairs are one step and must share the task
    assert all(sequence[i] == sequence[i + 1] for i in range(0, len(sequence), 2))
    assert sequence[::2] == ["a", "b"] * 4


def test_short_tasks_are_topped_up_and_length_grouping_shares_durations():
    tasks = ["a"] * 5 + ["b"] * 64
    lengths = [1.0] * 5 + [float(i % 8) for i in range(64)]
    sampler = TaskAlternatingSampler(tasks, batch_size=4, lengths=lengths, length_group_size=16)
    order = list(sampler)
    batches = [order[s : s + 4] for s in range(0, len(order), 4)]
    assert all(len({tasks[i] for i in b}) == 1 for b in batches)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches if tasks[b[0]] == "b"]
    assert sum(spread) / len(spread) <= 1.0  # random batches of 4 over 8 durations spread ~5 on average
    ungrouped = TaskAlternatingSampler(tasks, batch_size=4, length_group_size=1)
    assert len(ungrouped) == len(sampler)
