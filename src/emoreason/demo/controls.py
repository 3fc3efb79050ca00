"""The learning controls: does a trained model's emotion label come from the voice?

Scored on the synthetic corpus's held-out voices x held-out sentences (``unseen_sentence_clips``), each by comparing
the likelihoods of the label answers (``train.sft.label_accuracy``):

- ``audio``: the clips themselves;
- ``swapped_audio``: each clip's audio replaced by another test clip's with a different label; a model that reads the
  voice follows the donor clip and falls below chance (``swapped_follows_donor`` says how often it names the donor's
  label); a model that answers from anything else in the row keeps its score;
- ``silence``: one fixed-length silence for every clip (nothing, not even duration, reaches the model);
- ``transcript_only``: a words-only classifier trained on the training transcripts (no model involved): the corpus
  itself must not give the answer away.

Used by tests/test_sft_learning.py and by the demo, whose report prints the same four figures (it lives here, on
top of the layers, because it needs both the training code and the synthetic corpus).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..testing.synth_corpus import transcript_only_predictions, unseen_sentence_clips


def swap_audio(rows: list[dict], seed: int = 0) -> list[dict]:
    """Each row with the audio of another row whose label differs: rows shuffled within their label, ordered by label,
    and paired with the row as many places on as the largest label has rows (possible while no label holds more than
    half the rows)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row["label"], []).append(i)
    shift = max(len(v) for v in by_label.values()) if by_label else 0
    if 2 * shift > len(rows):
        raise ValueError("cannot give every clip a donor with another label: one label holds more than half the rows")
    order = []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        order += group
    donor_of = {order[k]: order[(k + shift) % len(order)] for k in range(len(order))}
    out = []
    for i, row in enumerate(rows):
        donor = rows[donor_of[i]]
        out.append({**row, "audio": donor["audio"], "clip_id": donor["clip_id"], "duration": donor["duration"],
                    "donor_label": donor["label"]})
    return out


def learning_controls(model_dir: str | Path, manifest: str | Path, data_root: str | Path,
                      system_prompt: str | None = None) -> dict[str, Any]:
    """The four control figures for a trained checkpoint (see the module docstring), with the clip count."""
    from ..data.schema import read_records
    from ..modeling import load_pretrained
    from ..train.sft import label_accuracy
    from ..train.tasks import TaskSpec, build_task_examples

    records = read_records(manifest)
    held_out = {r.id for r in unseen_sentence_clips(records)}
    if not held_out:
        raise ValueError(f"{manifest} has no held-out-voice test clips with unseen sentences")
    rows = [r for r in build_task_examples([TaskSpec("emotion_label")], records, split="test", seed=0)
            if r["clip_id"] in held_out]
    labels = sorted({r.label for r in records if r.label})
    model, processor = load_pretrained(model_dir)
    model.eval()
    score = dict(labels=labels, system_prompt=system_prompt)
    audio = label_accuracy(model, processor, rows, data_root, **score)
    swapped_rows = swap_audio(rows)
    swapped = label_accuracy(model, processor, swapped_rows, data_root, **score)
    follows = sum(p == r["donor_label"] for p, r in zip(swapped["predictions"], swapped_rows)) / len(swapped_rows)
    silence = label_accuracy(model, processor, rows, data_root, silence=True, **score)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.id in held_out]
    words = transcript_only_predictions(train, test, labels)
    return {
        "clips": len(rows),
        "audio": audio["accuracy"],
        "swapped_audio": swapped["accuracy"],
        "swapped_follows_donor": follows,
        "silence": silence["accuracy"],
        "transcript_only": sum(p == r.label for p, r in zip(words, test)) / len(test),
    }
