"""GRPO rewards for emotion reasoning: a registry of named reward functions that recipes pick by name.

Every reward follows TRL's reward-function signature ``f(prompts, completions, completion_ids, **columns)`` and
returns one float per completion (``None`` where the reward does not apply to the record, e.g. no measured cues).
Completions are parsed with :func:`emoreason.data.response_format.parse_response`, which never raises: a malformed
completion (missing tags, two answers, unknown emotion, empty) scores :data:`INVALID` instead of crashing.

Dataset columns the rewards read (:func:`emoreason.train.grpo.record_to_example` writes them): ``label`` (consensus
emotion), ``distribution`` and ``cues`` (JSON text, so that Arrow keeps each record's own keys), ``id`` (groups).

The reasoning-quality reward is the one with state: its raw judge score is weighted per group by :func:`trust_weights`
and switched on by a :class:`ProgressiveSchedule` once the policy's accuracy passes a threshold (the GRPO trainer
applies both on the rewards gathered from every process, so all ranks agree).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from scipy.spatial.distance import jensenshannon

from ..data.cues import ground, measured_levels
from ..data.labels import LabelError, confusion_credit, consensus_label, load_cooccurrence, normalize_emotion
from ..data.response_format import ParsedResponse, parse_response
from .judge import get_judge

INVALID = 0.0  # what a malformed completion scores on every outcome reward

RewardFunc = Callable[..., list[float | None]]


# -- helpers --------------------------------------------------------------------------------------------------------
def completion_text(completion: Any) -> str:
    """TRL hands conversational completions as ``[{"role": "assistant", "content": ...}]`` and plain ones as str."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            return "".join(part.get("text") or "" for part in content if isinstance(part, Mapping))
    return ""


def as_mapping(value: Any) -> dict[str, Any]:
    """A dict column that may arrive as JSON text (how the GRPO dataset stores it) or as a dict."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            return {}
    return {k: v for k, v in dict(value).items() if v is not None}


def _column(kwargs: Mapping[str, Any], name: str, n: int) -> list[Any]:
    values = kwargs.get(name)
    return list(values) if values is not None else [None] * n


def _parsed(completions: Sequence[Any], strict: bool = True) -> list[ParsedResponse]:
    return [parse_response(completion_text(c), strict=strict) for c in completions]


def _reference_label(label: Any, distribution: Mapping[str, float]) -> str | None:
    if label:
        try:
            return normalize_emotion(str(label))
        except LabelError:
            return None
    return consensus_label(distribution) if distribution else None


# -- outcome and format rewards ---------------------------------------------------------------------------------------
def format_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    """1 when the completion is exactly one non-empty think block then one known answer (distribution optional)."""
    return [1.0 if p.valid else INVALID for p in _parsed(completions)]


def accuracy_reward(prompts=None, completions=(), **kwargs) -> list[float | None]:
    """1 when a well-formed answer equals the consensus label; None for records without one."""
    return _score_against_reference(completions, kwargs, lambda answer, reference: float(answer == reference))


def _score_against_reference(completions, kwargs, score) -> list[float | None]:
    """``score(answer, reference)`` for each well-formed completion, INVALID for a malformed one, None for a record
    without a reference label (its consensus, or the majority of its distribution)."""
    n = len(completions)
    rewards: list[float | None] = []
    for parsed, label, dist in zip(_parsed(completions), _column(kwargs, "label", n),
                                   _column(kwargs, "distribution", n)):
        reference = _reference_label(label, as_mapping(dist))
        if reference is None:
            rewards.append(None)
        else:
            rewards.append(score(parsed.answer, reference) if parsed.valid else INVALID)
    return rewards


def soft_label_reward(prompts=None, completions=(), **kwargs) -> list[float | None]:
    """The annotators' share of the predicted emotion: a minority-but-plausible answer earns partial credit."""
    n = len(completions)
    rewards: list[float | None] = []
    for parsed, dist in zip(_parsed(completions), _column(kwargs, "distribution", n)):
        shares = as_mapping(dist)
        if not shares:
            rewards.append(None)
        elif not parsed.valid:
            rewards.append(INVALID)
        else:
            rewards.append(float(shares.get(parsed.answer, 0.0)))
    return rewards


def jensen_shannon_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """JS divergence in bits (0 = identical, 1 = disjoint) between two soft labels over any emotions."""
    keys = sorted(set(p) | set(q))
    a = [max(float(p.get(k, 0.0)), 0.0) for k in keys]
    b = [max(float(q.get(k, 0.0)), 0.0) for k in keys]
    if sum(a) <= 0 or sum(b) <= 0:
        return 1.0
    # scipy returns the JS *distance* (the square root of the divergence).
    return float(jensenshannon(a, b, base=2.0)) ** 2


def distribution_reward(prompts=None, completions=(), **kwargs) -> list[float | None]:
    """1 - JS divergence between the predicted <distribution> and the annotators'; a missing block scores INVALID."""
    n = len(completions)
    rewards: list[float | None] = []
    for parsed, dist in zip(_parsed(completions), _column(kwargs, "distribution", n)):
        shares = as_mapping(dist)
        if not shares:
            rewards.append(None)
        elif not parsed.valid or not parsed.distribution:
            rewards.append(INVALID)
        else:
            rewards.append(1.0 - jensen_shannon_divergence(parsed.distribution, shares))
    return rewards


def make_cooccurrence_reward(matrix: str | Mapping[str, Any] = "cooccurrence.json",
                             partial_scale: float = 0.5) -> RewardFunc:
    """Penalisation-matrix reward: 1 for the consensus, partial credit for a confusion the annotators themselves make
    (``data.labels.confusion_credit`` on datagen's ``cooccurrence.json``), 0 for a malformed completion."""
    loaded = load_cooccurrence(matrix)

    def cooccurrence(prompts=None, completions=(), **kwargs) -> list[float | None]:
        return _score_against_reference(
            completions, kwargs, lambda answer, reference: confusion_credit(answer, reference, loaded, partial_scale))

    return cooccurrence


# -- cue grounding --------------------------------------------------------------------------------------------------
def cue_grounding_score(rationale: str, cues: Mapping[str, Any], contradiction_penalty: float = 1.0) -> float | None:
    """(supported - penalty * contradicted claims) / checked claims, in [-penalty, 1]; 0 when no cue is claimed.

    Claims are read and checked by :func:`emoreason.data.cues.ground` (negations, hedges, synonyms, repeated claims:
    see that module). ``None`` when the record has no measured cue levels to check against.
    """
    if not measured_levels(cues):
        return None
    checked = ground(rationale, cues)
    if not checked.checked:
        return 0.0
    return (len(checked.supported) - contradiction_penalty * len(checked.contradicted)) / checked.checked


def make_cue_grounding_reward(contradiction_penalty: float = 1.0) -> RewardFunc:
    def cue_grounding(prompts=None, completions=(), **kwargs) -> list[float | None]:
        """Claims about the measured cues (pitch, its variation, volume, rate, intonation, pauses) must agree."""
        n = len(completions)
        rewards: list[float | None] = []
        for parsed, cues in zip(_parsed(completions), _column(kwargs, "cues", n)):
            score = cue_grounding_score(parsed.think or "", as_mapping(cues), contradiction_penalty)
            if score is None:
                rewards.append(None)
            else:
                rewards.append(score if parsed.valid else INVALID)
        return rewards

    return cue_grounding


# -- penalties ------------------------------------------------------------------------------------------------------
def make_length_penalty(target_tokens: int = 256, max_penalty: float = 1.0) -> RewardFunc:
    if target_tokens <= 0:
        raise ValueError(f"length reward: target_tokens must be > 0, got {target_tokens}")

    def length(prompts=None, completions=(), completion_ids=None, **kwargs) -> list[float]:
        """0 up to ``target_tokens``, then minus the overshoot as a share of the target (floored at -max_penalty)."""
        lengths = ([len(ids) for ids in completion_ids] if completion_ids is not None
                   else [len(completion_text(c).split()) for c in completions])
        return [-min(max_penalty, max(0, n - target_tokens) / target_tokens) for n in lengths]

    return length


def repetition_ratio(text: str, ngram: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none repeated)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def make_repetition_penalty(ngram: int = 3) -> RewardFunc:
    def repetition(prompts=None, completions=(), **kwargs) -> list[float]:
        """Minus the share of repeated word n-grams (degenerate loops score near -1)."""
        return [-repetition_ratio(completion_text(c), ngram) for c in completions]

    return repetition


# -- reasoning quality: judge x trust weight x progressive schedule ----------------------------------------------------
class ProgressiveSchedule:
    """Keeps the reasoning reward off until the policy is accurate enough (GRPO-PTR-style progressive reward).

    ``update(batch_accuracy)`` folds the batch's accuracy into an exponential moving average; once the average
    reaches ``threshold`` (and at least ``min_steps`` updates were seen) the schedule switches on and stays on.
    ``threshold <= 0`` means always on.
    """

    def __init__(self, threshold: float = 0.5, smoothing: float = 0.9, min_steps: int = 1):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"schedule: smoothing must be in [0, 1), got {smoothing}")
        self.threshold = threshold
        self.smoothing = smoothing
        self.min_steps = min_steps
        self.accuracy: float | None = None
        self.steps = 0
        self.active = threshold <= 0

    def update(self, batch_accuracy: float) -> bool:
        if not math.isnan(batch_accuracy):
            self.steps += 1
            self.accuracy = (batch_accuracy if self.accuracy is None
                             else self.smoothing * self.accuracy + (1 - self.smoothing) * batch_accuracy)
            if self.steps >= self.min_steps and self.accuracy >= self.threshold:
                self.active = True
        return self.active

    def state_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "steps": self.steps, "active": self.active}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accuracy, self.steps, self.active = state["accuracy"], state["steps"], state["active"]


def trust_weights(quality: torch.Tensor, correct: torch.Tensor, num_generations: int,
                  sharpness: float = 5.0) -> torch.Tensor:
    """Per-completion trust in the judge, computed per group of ``num_generations`` consecutive completions.

    Within a group that has both correct and incorrect answers, let ``gap`` be the mean judge score of the incorrect
    ones minus that of the correct ones. A judge that rates wrong answers' reasoning higher is not to be trusted on
    that group: the weight is ``exp(-sharpness * max(gap, 0))`` (1 when the judge ranks correct answers at least as
    high, or when the group is all-correct / all-incorrect). NaN entries (no judge score / no label) are ignored.
    """
    q = quality.view(-1, num_generations)
    c = correct.view(-1, num_generations)
    ok = ~torch.isnan(q) & ~torch.isnan(c)
    is_right = ok & (c > 0.5)
    is_wrong = ok & (c <= 0.5)
    q0 = torch.nan_to_num(q, nan=0.0)
    n_right, n_wrong = is_right.sum(1), is_wrong.sum(1)
    mean_right = (q0 * is_right).sum(1) / n_right.clamp(min=1)
    mean_wrong = (q0 * is_wrong).sum(1) / n_wrong.clamp(min=1)
    mixed = (n_right > 0) & (n_wrong > 0)
    gap = torch.where(mixed, mean_wrong - mean_right, torch.zeros_like(mean_right)).clamp(min=0)
    weight = torch.exp(-sharpness * gap)
    return weight.repeat_interleave(num_generations)


class ReasoningReward:
    """Raw judge score in [0, 1] of the rationale (a judge name from :data:`emoreason.train.judge.JUDGES` or an object
    with ``score``), trust-weighted per group and switched on by a :class:`ProgressiveSchedule`.

    Until the schedule (``threshold``, ``smoothing``, ``min_steps``) is on, the judge is not called and the reward is
    0. A judge that cannot be reached raises (:class:`emoreason.train.judge.JudgeUnavailable`).

    It is a *group reward*: besides scoring completions one by one (``__call__``), it sees the whole reward table of
    a step, gathered from every process, through :meth:`group_hook`, and keeps state that travels with checkpoints
    (:meth:`state_dict` / :meth:`load_state_dict`). The GRPO trainer calls those on any reward that has them and names
    none: ``requires`` lists the rewards whose columns the hook reads (checked when the rewards are built).
    """

    requires = ("accuracy",)

    def __init__(self, judge: Any = "cue_heuristic", judge_options: Mapping[str, Any] | None = None,
                 threshold: float = 0.5, smoothing: float = 0.9, min_steps: int = 1, trust_sharpness: float = 5.0,
                 schedule: ProgressiveSchedule | None = None):
        self.judge = get_judge(judge, **dict(judge_options or {})) if isinstance(judge, str) else judge
        self.schedule = schedule or ProgressiveSchedule(threshold=threshold, smoothing=smoothing, min_steps=min_steps)
        self.trust_sharpness = trust_sharpness
        self.__name__ = "reasoning"

    def __call__(self, prompts=None, completions=(), **kwargs) -> list[float | None]:
        parsed = _parsed(completions)
        if not self.schedule.active:
            return [0.0] * len(parsed)
        n = len(parsed)
        contexts = [{"cues": as_mapping(cues), "label": label, "transcript": transcript, "answer": p.answer}
                    for cues, label, transcript, p in zip(_column(kwargs, "cues", n), _column(kwargs, "label", n),
                                                          _column(kwargs, "transcript", n), parsed)]
        valid = [i for i, p in enumerate(parsed) if p.valid]
        scores = self.judge.score([parsed[i].think or "" for i in valid], [contexts[i] for i in valid]) if valid else []
        rewards: list[float | None] = [INVALID] * n
        for i, score in zip(valid, scores):
            rewards[i] = None if score is None else float(min(1.0, max(0.0, score)))
        return rewards

    def group_hook(self, rewards: torch.Tensor, names: Sequence[str], num_generations: int,
                   training: bool) -> dict[str, float]:
        """Weight this reward's column of ``rewards`` (completions x reward functions, in place) by the judge's trust
        on each group (:func:`trust_weights` against the accuracy column); a training step also advances the
        schedule with the batch's accuracy. Returns the step's metrics."""
        own, accuracy = rewards[:, names.index(self.__name__)], rewards[:, names.index("accuracy")]
        trust = trust_weights(own, accuracy, num_generations, self.trust_sharpness)
        rewards[:, names.index(self.__name__)] = own * trust
        if training:
            self.schedule.update(torch.nanmean(accuracy).item())
        return {"reasoning/trust": trust.mean().item(), "reasoning/active": float(self.schedule.active)}

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])

    def probe(self) -> None:
        if callable(getattr(self.judge, "probe", None)):
            self.judge.probe()


def make_reasoning_reward(**options: Any) -> ReasoningReward:
    return ReasoningReward(**options)


# -- registry -------------------------------------------------------------------------------------------------------
# name -> factory(**options) -> reward function. The name is what recipes list in `reward_funcs` and what TRL logs.
REWARDS: dict[str, Callable[..., RewardFunc]] = {
    "format": lambda: format_reward,
    "accuracy": lambda: accuracy_reward,
    "soft_label": lambda: soft_label_reward,
    "distribution": lambda: distribution_reward,
    "cooccurrence": make_cooccurrence_reward,
    "cue_grounding": make_cue_grounding_reward,
    "reasoning": make_reasoning_reward,
    "length": make_length_penalty,
    "repetition": make_repetition_penalty,
}


def _named(func: RewardFunc, name: str) -> RewardFunc:
    if not inspect.isfunction(func):  # a reward object (a group reward): it keeps its methods and state
        func.__name__ = name
        return func

    @functools.wraps(func)
    def reward(*args, **kwargs):
        return func(*args, **kwargs)

    reward.__name__ = reward.__qualname__ = name
    return reward


def get_reward_funcs(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> list[RewardFunc]:
    """Build the named rewards; ``options[name]`` are that factory's keyword arguments. Each gets ``__name__ = name``
    so TRL logs ``rewards/<name>/mean``. A reward that reads other rewards' columns (``requires``) needs them listed."""
    options = dict(options or {})
    unknown = [n for n in list(names) + list(options) if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {', '.join(REWARDS)}")
    funcs = []
    for name in names:
        try:
            func = REWARDS[name](**dict(options.get(name) or {}))
        except TypeError as err:
            raise ValueError(f"reward {name!r}: bad options {dict(options.get(name) or {})}: {err}") from None
        funcs.append(_named(func, name))
    for name, func in zip(names, funcs):
        missing = [r for r in getattr(func, "requires", ()) if r not in names]
        if missing:
            raise ValueError(f"reward {name!r} needs {', '.join(map(repr, missing))} in reward_funcs too: its group "
                             "hook reads their columns (give them weight 0 to use them only for that)")
    return funcs


def group_rewards(funcs: Sequence[RewardFunc]) -> list[RewardFunc]:
    """The rewards that see a step's whole reward table (``group_hook``) and may keep state across steps."""
    return [f for f in funcs if callable(getattr(f, "group_hook", None))]


def probe_reward_funcs(funcs: Sequence[RewardFunc]) -> None:
    """Ask every remote judge behind ``funcs`` one tiny question; raises at once (before any model is loaded) when a
    judge cannot be reached, instead of a run whose reasoning reward is missing."""
    for func in funcs:
        if callable(getattr(func, "probe", None)):
            func.probe()
