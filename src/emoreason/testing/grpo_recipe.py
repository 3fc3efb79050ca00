"""The tiny GRPO learning recipe shared by the HF-generate test (tests/test_grpo.py) and the vLLM colocate one
(tests_vllm/test_grpo_vllm.py): reasoning records from the synthetic corpus, a short SFT warm start, and the GRPO
settings under which the tiny model's reward rises (format + length rewards, 24 steps at 3e-3).

Both tests run the same schedule through the same functions, so their figures compare like with like.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import NamedTuple

from ..data.cues import CUES
from ..data.response_format import format_response
from ..data.schema import EmotionRecord, read_records

# espeak-ng control of each graded cue and the upper limits of its low / normal / high bands (the thresholds sit
# between the synthetic emotions); the level words, nouns and flips are the cue vocabulary's (emoreason.data.cues).
_CONTROLS = {"pitch_level": ("pitch", (35, 62, 100)), "energy_level": ("amplitude", (70, 140, 201)),
             "rate_level": ("rate", (140, 190, 400))}


def synthetic_cues(record: EmotionRecord) -> dict:
    params = record.meta["espeak"]
    cues = {}
    for cue, (control, limits) in _CONTROLS.items():
        cues[cue] = next(level for limit, level in zip(limits, CUES[cue].levels) if params[control] < limit)
    cues["intonation"] = "falling"
    return cues


def rationale(cues: dict, label: str) -> str:
    said = ", ".join(f"the {CUES[c].noun} is {cues[c]}" for c in _CONTROLS)
    return format_response(f"{said[0].upper()}{said[1:]}.", label)


def reasoning_records(manifest: str | Path) -> tuple[list[EmotionRecord], list[EmotionRecord]]:
    """What the data stage writes, built from the synthetic corpus: reasoning records (records.jsonl) and preference
    pairs (pairs.jsonl, one chosen + three rejected kinds per clip)."""
    records, pairs = [], []
    for record in read_records(manifest):
        cues = synthetic_cues(record)
        record.cues = cues
        record.task = "emotion_reasoning"
        record.instruction = "What emotion does the speaker express? Explain your reasoning, then answer."
        record.response = rationale(cues, record.label)
        records.append(record)
        hallucinated = dict(cues, pitch_level=CUES["pitch_level"].opposite[cues["pitch_level"]])
        wrong = next(e for e in ("happy", "sad", "angry", "neutral") if e != record.label)
        spurious = record.response.replace("</think>", "The voice is trembling and the intonation is rising.\n</think>")
        pair = EmotionRecord.from_dict(record.to_dict())
        pair.meta = dict(record.meta, rejected=[
            {"text": rationale(hallucinated, record.label), "kind": "hallucinated_cue"},
            {"text": rationale(cues, wrong), "kind": "wrong_emotion"},
            {"text": spurious, "kind": "spurious_cue"},
        ])
        pairs.append(pair)
    return records, pairs


def warm_start(collator_class, model_dir, records_file, data_root, out_dir, steps=60, lr=5e-3, batch_size=4):
    """A few plain SFT steps on short canonical answers, so that completions end (and vary) before GRPO starts.

    ``collator_class``: :class:`emoreason.train.collators.SFTCollator`, passed in (this package sits beside
    ``emoreason.train``, not above it)."""
    import random

    import torch

    from ..modeling import load_pretrained

    torch.manual_seed(0)
    model, processor = load_pretrained(model_dir)
    rows = [{"id": r.id, "audio": r.audio, "instruction": r.instruction,
             "response": format_response(f"The pitch is {r.cues['pitch_level']}.", r.label)}
            for r in read_records(records_file) if r.split == "train"]
    collate = collator_class(processor, data_root)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    model.train()
    for _ in range(steps):
        model(**collate(rng.sample(rows, batch_size))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# The learning schedule (GRPO config overrides) and its prompt count: format + length rewards (the tiny model learns
# to close its answer sooner), 24 steps at 3e-3, 8 rows (2 prompts x 4 generations) per step.
LEARNING_PROMPTS = 32
LEARNING_PROBE_PROMPTS = 8
LEARNING_CONFIG = dict(
    reward_funcs=("format", "length"), reward_kwargs={"length": {"target_tokens": 12, "max_penalty": 3.0}},
    max_steps=24, learning_rate=3e-3, per_device_train_batch_size=8, num_generations=4, max_completion_length=32,
    per_device_eval_batch_size=32, num_generations_eval=4)


def grpo_options(out_dir, reward_funcs=("format", "accuracy"), **config) -> dict:
    """Keyword arguments of ``EmoReasonGRPOConfig`` for the tiny tests: small defaults, ``config`` overrides them.
    (This package sits beside ``emoreason.train``, not above it, so the caller builds the config and the trainer.)"""
    options = dict(output_dir=str(Path(out_dir) / "grpo"), per_device_train_batch_size=4, num_generations=2,
                   max_completion_length=8, max_steps=1, learning_rate=1e-3, report_to="none", use_cpu=True,
                   save_strategy="no", logging_steps=1, reward_funcs=list(reward_funcs), beta=0.0, seed=0)
    options.update(config)
    return options


def run_learning_recipe(make_trainer, collator_class, model_dir, records_file, data_root, out_dir, **config) -> dict:
    """Warm start, then the learning schedule (``config`` adds to it: ``use_vllm=True, vllm_mode="colocate"`` for the
    vLLM path); the mean reward on a fixed probe of prompts is measured before and after.

    ``collator_class`` as in :func:`warm_start`.
    ``make_trainer(model_dir, records_file, data_root, out_dir, n_prompts=..., **grpo_config)`` returns (an
    ``AudioGRPOTrainer`` on the first ``n_prompts`` training records, those rows), its config built with
    :func:`grpo_options`. Returns ``{"before": eval metrics, "after": eval metrics, "curve": per-step training
    rewards, "trainer": trainer}``."""
    import datasets

    out_dir = Path(out_dir)
    start = warm_start(collator_class, model_dir, records_file, data_root, out_dir / "sft")
    trainer, rows = make_trainer(start, records_file, data_root, out_dir, n_prompts=LEARNING_PROMPTS,
                                 **{**LEARNING_CONFIG, **config})
    probe = datasets.Dataset.from_list(rows[:LEARNING_PROBE_PROMPTS])
    before = trainer.evaluate(probe)
    trainer.train()
    after = trainer.evaluate(probe)
    curve = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"before": before, "after": after, "curve": curve, "trainer": trainer}


# How many standard errors the training reward of the last k steps must exceed that of the first k by. Measured
# ratios run from 2.9 to 11 (HF generate and vLLM colocate, 1 and 2 threads; docs/rl.md): 2 leaves room for the
# thread count and library versions; a flat curve passes it a few percent of the time (t-test, 10 d.o.f.).
MIN_RISE_STANDARD_ERRORS = 2.0


class Rise(NamedTuple):
    first: float   # mean training reward over the first k steps
    last: float    # ... over the last k steps
    spread: float  # step-to-step spread: the larger of the two windows' standard deviations
    noise: float   # standard error of ``last - first`` (the two windows' variances over k)


def rise(curve: list[float], k: int = 6) -> Rise:
    """How far the per-step training reward moved from its first ``k`` steps to its last ``k``, and its noise."""
    first, last = curve[:k], curve[-k:]
    s_first, s_last = statistics.stdev(first), statistics.stdev(last)
    return Rise(statistics.fmean(first), statistics.fmean(last), max(s_first, s_last),
                math.sqrt((s_first ** 2 + s_last ** 2) / k))


def describe(result: dict, k: int = 6) -> str:
    before, after = result["before"], result["after"]
    r = rise(result["curve"], k)
    return (f"probe reward {before['eval_reward']:.3f} -> {after['eval_reward']:.3f} "
            f"(format {before['eval_rewards/format/mean']:.2f} -> {after['eval_rewards/format/mean']:.2f}, "
            f"length {before['eval_rewards/length/mean']:.2f} -> {after['eval_rewards/length/mean']:.2f}, "
            f"completion length {before['eval_completions/mean_length']:.1f} -> "
            f"{after['eval_completions/mean_length']:.1f}); training reward, first {k} steps {r.first:.3f}, "
            f"last {k} {r.last:.3f}, spread {r.spread:.3f}, standard error of the rise {r.noise:.3f} "
            f"({(r.last - r.first) / max(r.noise, 1e-9):.1f}x); curve "
            + " ".join(f"{x:.2f}" for x in result["curve"]))
