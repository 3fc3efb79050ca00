"""Test-time-scaling strategies: ways to turn one or more completions into a label and a distribution.

Each strategy is an ``async def name(ctx, record, **params) -> ItemResult`` registered in :data:`STRATEGIES`; suites
pick them by name and set their parameters. Every strategy reports the tokens and requests it spent on the item, so
the report can plot accuracy against compute.

- ``direct``: ask for the label only, greedy.
- ``cot_greedy``: reason then answer (the shared format), greedy.
- ``self_consistency``: N sampled reasonings in one ``n=N`` request, majority vote (Wang et al., ICLR 2023).
- ``sample_distribution``: the same samples as a vote histogram with Dirichlet smoothing: the predicted distribution.
- ``best_of_n``: N samples, keep the one a verifier likes best: the model's own mean token log-likelihood, or a judge.
- ``weighted_vote``: N samples, votes weighted by the verifier's score (when every valid sample scores 0, the vote
  falls back to an unweighted one and the item notes it).
- ``alm_verifier`` / ``weighted_alm_verifier``: ``best_of_n`` / ``weighted_vote`` with an audio LLM as the verifier
  (``verifier: audio``): it hears the clip and scores each candidate rationale + answer with the ``audio_verifier``
  rubric (the suite's ``verifier:`` endpoint, or the evaluated model itself).
- ``self_refine``: answer, then ask the model to check and revise its answer, ``rounds`` times (Madaan et al., 2023).
- ``budget_forcing``: keep the model thinking: when it closes its reasoning early, append "Wait," and let it go on,
  then force the answer (Muennighoff et al., "s1: Simple test-time scaling", 2025). Needs an endpoint that continues
  a partial assistant message (``continue_final_message``, as vLLM and the built-in server do).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.conversation import input_audio_part, record_conversation
from ..data.response_format import ParsedResponse, parse_answer
from ..data.schema import EmotionRecord
from .client import EndpointClient

from .prompts import PromptSet


@dataclass
class ItemResult:
    record_id: str
    strategy: str
    prediction: str | None = None
    distribution: dict[str, float] | None = None
    final_text: str | None = None
    completions: list[str] = field(default_factory=list)
    valid_samples: int = 0
    total_samples: int = 0
    scores: list[float] | None = None  # verifier scores, when a verifier ran
    style: str = "cot"  # the answer format the strategy asked for ("direct" or "cot")
    prompt_tokens: int = 0  # every request the strategy made, verifier calls included
    completion_tokens: int = 0
    verifier_prompt_tokens: int = 0  # the verifier's share of the two counts above
    verifier_completion_tokens: int = 0
    requests: int = 0
    failed: bool = False
    failure: str | None = None
    notes: list[str] = field(default_factory=list)  # what the strategy had to fall back on
    judge_score: float | None = None  # the suite judge's grade of the final rationale in [0, 1], when one ran

    @property
    def valid(self) -> bool:
        return self.prediction is not None


@dataclass
class StrategyContext:
    client: EndpointClient
    labels: tuple[str, ...]
    prompts: PromptSet
    data_root: Path
    max_tokens: int = 256
    include_transcript: bool = False
    audio_transport: str = "input_audio"
    judge: Any = None  # emoreason.eval.judge.RubricJudge
    verifier: Any = None  # emoreason.eval.verifier.AudioVerifier
    seed: int = 0  # the suite's seed; each request carries one derived from it and the record

    def audio_part(self, record: EmotionRecord) -> dict:
        path = record.audio_path(self.data_root)
        if self.audio_transport == "file_url":
            return {"type": "audio_url", "audio_url": {"url": path.as_uri()}}
        if not path.is_file():
            raise FileNotFoundError(f"audio of record {record.id} not found: {path}")
        return input_audio_part(path)

    def messages(self, record: EmotionRecord, style: str) -> list[dict]:
        if style not in self.prompts.styles:
            raise KeyError(f"the prompt file has no style {style!r} (has {sorted(self.prompts.styles)})")
        text = self.prompts.styles[style].format(labels=", ".join(self.labels))
        if self.include_transcript and record.transcript and self.prompts.transcript:
            text = self.prompts.transcript.format(transcript=record.transcript) + "\n" + text
        # The conversation training used (emoreason.data.conversation): system, clip, dialogue context, instruction.
        return record_conversation(record, text, system_prompt=self.prompts.system, audio=self.audio_part(record))

    async def ask(self, result: ItemResult, **request: Any) -> dict:
        # The current OpenAI name; the client falls back to `max_tokens` for servers that only know that one.
        request["max_completion_tokens"] = request.pop("max_tokens", None) or self.max_tokens
        request.setdefault("seed", request_seed(self.seed, result.record_id))
        response = await self.client.chat(**request)
        usage = response.get("usage") or {}
        result.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        result.completion_tokens += int(usage.get("completion_tokens") or 0)
        result.requests += 1
        return response


Strategy = Callable[..., Awaitable[ItemResult]]
STRATEGIES: dict[str, Strategy] = {}


# What a strategy needs beyond the evaluated endpoint, declared when it registers: a fixed set, or a function of the
# suite's parameters for the strategy (best_of_n needs the audio verifier only with `verifier: audio`).
NEEDS = ("judge", "audio_verifier")
STRATEGY_NEEDS: dict[str, Callable[[dict[str, Any]], set[str]]] = {}


def register_strategy(name: str, needs: tuple[str, ...] | Callable[[dict[str, Any]], Any] = ()
                      ) -> Callable[[Strategy], Strategy]:
    def decorator(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        STRATEGY_NEEDS[name] = needs if callable(needs) else (lambda params, fixed=frozenset(needs): set(fixed))
        return fn

    return decorator


def strategy_needs(name: str, params: dict[str, Any] | None = None) -> set[str]:
    """What strategy ``name`` with ``params`` needs besides the endpoint (names from :data:`NEEDS`)."""
    needs = set(STRATEGY_NEEDS[name](dict(params or {})))
    unknown = needs - set(NEEDS)
    if unknown:
        raise ValueError(f"strategy {name!r} declares unknown needs {sorted(unknown)}; known: {NEEDS}")
    return needs


def _verifier_needs(params: dict[str, Any]) -> set[str]:
    return {"audio": {"audio_verifier"}, "judge": {"judge"}}.get(params.get("verifier", "loglik"), set())


# -- helpers ---------------------------------------------------------------------------------------------------
def request_seed(suite_seed: int, record_id: str) -> int:
    """The sampling seed of a record's requests: a function of the suite's seed and the record only, so a rerun
    without the cache samples the same answers (on servers that honour ``seed``)."""
    digest = hashlib.sha256(f"{suite_seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def texts(response: dict) -> list[str]:
    return [(c.get("message") or {}).get("content") or "" for c in response.get("choices", [])]


def parse(text: str, labels: tuple[str, ...], reasoning: bool) -> ParsedResponse:
    """The shared style-aware parser (:func:`emoreason.data.response_format.parse_answer`)."""
    return parse_answer(text, "cot" if reasoning else "direct", labels)


def one_hot(label: str | None, labels: tuple[str, ...]) -> dict[str, float] | None:
    return None if label is None else {k: float(k == label) for k in labels}


def own_distribution(parsed: ParsedResponse, labels: tuple[str, ...]) -> dict[str, float] | None:
    """The completion's stated distribution if it gave one, else all mass on its answer."""
    if parsed.answer is None:
        return None
    if parsed.distribution:
        return {k: float(parsed.distribution.get(k, 0.0)) for k in labels}
    return one_hot(parsed.answer, labels)


def vote(answers: list[str | None], labels: tuple[str, ...], weights: list[float] | None = None,
         alpha: float = 0.0) -> tuple[str | None, dict[str, float] | None]:
    """Weighted vote over valid answers -> (winner, shares with Dirichlet smoothing ``alpha``). Ties go to the
    label listed first in the suite."""
    weights = weights or [1.0] * len(answers)
    tally = Counter()
    for answer, weight in zip(answers, weights):
        if answer is not None:
            tally[answer] += weight
    if not tally:
        return None, None
    total = sum(tally.values()) + alpha * len(labels)
    if not total > 0:
        raise ValueError("vote: the valid answers' weights sum to 0; give positive weights")
    shares = {k: (tally.get(k, 0.0) + alpha) / total for k in labels}
    winner = max(labels, key=lambda k: (tally.get(k, 0.0), -labels.index(k)))
    return winner, shares


def _single(result: ItemResult, text: str, labels: tuple[str, ...], reasoning: bool) -> ItemResult:
    result.style = "cot" if reasoning else "direct"
    parsed = parse(text, labels, reasoning)
    result.completions, result.final_text = [text], text
    result.total_samples, result.valid_samples = 1, int(parsed.answer is not None)
    result.prediction = parsed.answer
    result.distribution = own_distribution(parsed, labels)
    return result


async def _sample(ctx: StrategyContext, record: EmotionRecord, result: ItemResult, n: int, temperature: float,
                  top_p: float, max_tokens: int | None, logprobs: bool = False) -> tuple[list[str], dict]:
    request = dict(messages=ctx.messages(record, "cot"), n=n, temperature=temperature, top_p=top_p,
                   max_tokens=max_tokens or ctx.max_tokens)
    if logprobs:
        request["logprobs"] = True
    response = await ctx.ask(result, **request)
    samples = texts(response)
    result.completions = samples
    result.total_samples = len(samples)
    return samples, response


async def _voted_samples(ctx: StrategyContext, record: EmotionRecord, result: ItemResult, n: int, temperature: float,
                         top_p: float, max_tokens: int | None, alpha: float) -> ItemResult:
    """N sampled chains of thought, their answers voted (``alpha``: Dirichlet smoothing of the vote histogram)."""
    samples, _ = await _sample(ctx, record, result, n, temperature, top_p, max_tokens)
    answers = [parse(s, ctx.labels, True).answer for s in samples]
    result.valid_samples = sum(a is not None for a in answers)
    result.prediction, result.distribution = vote(answers, ctx.labels, alpha=alpha)
    result.final_text = next((s for s, a in zip(samples, answers) if a == result.prediction), samples[0])
    return result


def mean_logprob(choice: dict) -> float:
    content = ((choice.get("logprobs") or {}).get("content")) or []
    if not content:
        raise ValueError("the endpoint returned no logprobs; use a server that supports logprobs or verifier: judge")
    return sum(t["logprob"] for t in content) / len(content)


async def verifier_scores(ctx: StrategyContext, record: EmotionRecord, result: ItemResult, samples: list[str],
                          response: dict, parsed: list[ParsedResponse], verifier: str) -> list[float]:
    """One score per sample, higher is better: mean token log-probability, or the judge's score in [0, 1]."""
    if verifier == "loglik":
        return [mean_logprob(choice) for choice in response["choices"]]
    if verifier == "audio":
        if ctx.verifier is None:
            raise ValueError("verifier: audio needs an audio verifier (the runner builds one from the suite)")
        audio = ctx.audio_part(record)  # encoded once, heard by the verifier with every candidate
        seed = request_seed(ctx.seed, record.id)
        verdicts = await asyncio.gather(*(ctx.verifier.score(record, audio, text, p.answer, seed)
                                          for text, p in zip(samples, parsed)))
        for verdict in verdicts:
            result.prompt_tokens += verdict.prompt_tokens
            result.completion_tokens += verdict.completion_tokens
            result.verifier_prompt_tokens += verdict.prompt_tokens
            result.verifier_completion_tokens += verdict.completion_tokens
            result.requests += 1
        return [v.normalized if v.normalized is not None else 0.0 for v in verdicts]
    if verifier == "judge":
        if ctx.judge is None:
            raise ValueError("verifier: judge needs a judge (suite `judge:` or --judge-endpoint)")
        scored = await asyncio.gather(*(ctx.judge.score(record, p.think or text, p.answer)
                                        for text, p in zip(samples, parsed)))
        for judged in scored:
            result.prompt_tokens += judged.prompt_tokens
            result.completion_tokens += judged.completion_tokens
            result.verifier_prompt_tokens += judged.prompt_tokens
            result.verifier_completion_tokens += judged.completion_tokens
            result.requests += 1
        return [j.normalized if j.normalized is not None else 0.0 for j in scored]
    raise ValueError(f"unknown verifier {verifier!r}; use loglik, judge or audio")


# -- strategies ------------------------------------------------------------------------------------------------
@register_strategy("direct")
async def direct(ctx: StrategyContext, record: EmotionRecord, max_tokens: int = 16) -> ItemResult:
    result = ItemResult(record.id, "direct")
    response = await ctx.ask(result, messages=ctx.messages(record, "direct"), temperature=0.0, max_tokens=max_tokens)
    return _single(result, texts(response)[0], ctx.labels, reasoning=False)


@register_strategy("cot_greedy")
async def cot_greedy(ctx: StrategyContext, record: EmotionRecord, max_tokens: int | None = None) -> ItemResult:
    result = ItemResult(record.id, "cot_greedy")
    response = await ctx.ask(result, messages=ctx.messages(record, "cot"), temperature=0.0,
                             max_tokens=max_tokens or ctx.max_tokens)
    return _single(result, texts(response)[0], ctx.labels, reasoning=True)


@register_strategy("self_consistency")
async def self_consistency(ctx: StrategyContext, record: EmotionRecord, n: int = 8, temperature: float = 0.8,
                           top_p: float = 1.0, max_tokens: int | None = None) -> ItemResult:
    return await _voted_samples(ctx, record, ItemResult(record.id, "self_consistency"), n, temperature, top_p,
                                max_tokens, alpha=0.0)


@register_strategy("sample_distribution")
async def sample_distribution(ctx: StrategyContext, record: EmotionRecord, n: int = 8, temperature: float = 1.0,
                              top_p: float = 1.0, alpha: float = 0.5, max_tokens: int | None = None) -> ItemResult:
    return await _voted_samples(ctx, record, ItemResult(record.id, "sample_distribution"), n, temperature, top_p,
                                max_tokens, alpha=alpha)


@register_strategy("best_of_n", needs=_verifier_needs)
async def best_of_n(ctx: StrategyContext, record: EmotionRecord, n: int = 8, temperature: float = 0.8,
                    top_p: float = 1.0, verifier: str = "loglik", max_tokens: int | None = None) -> ItemResult:
    result = ItemResult(record.id, "best_of_n")
    samples, response = await _sample(ctx, record, result, n, temperature, top_p, max_tokens,
                                      logprobs=verifier == "loglik")
    parsed = [parse(s, ctx.labels, True) for s in samples]
    result.valid_samples = sum(p.answer is not None for p in parsed)
    result.scores = await verifier_scores(ctx, record, result, samples, response, parsed, verifier)
    # Valid samples first: a verifier may like a malformed completion, but it has no answer to give.
    best = max(range(len(samples)), key=lambda i: (parsed[i].answer is not None, result.scores[i]))
    result.final_text = samples[best]
    result.prediction = parsed[best].answer
    result.distribution = own_distribution(parsed[best], ctx.labels)
    return result


@register_strategy("weighted_vote", needs=_verifier_needs)
async def weighted_vote(ctx: StrategyContext, record: EmotionRecord, n: int = 8, temperature: float = 0.8,
                        top_p: float = 1.0, verifier: str = "loglik", max_tokens: int | None = None) -> ItemResult:
    result = ItemResult(record.id, "weighted_vote")
    samples, response = await _sample(ctx, record, result, n, temperature, top_p, max_tokens,
                                      logprobs=verifier == "loglik")
    parsed = [parse(s, ctx.labels, True) for s in samples]
    answers = [p.answer for p in parsed]
    result.valid_samples = sum(a is not None for a in answers)
    result.scores = await verifier_scores(ctx, record, result, samples, response, parsed, verifier)
    # Mean log-probabilities become per-token probabilities (geometric means), judge scores are already in [0, 1].
    weights = [math.exp(s) for s in result.scores] if verifier == "loglik" else list(result.scores)
    weights = [w if math.isfinite(w) and w > 0 else 0.0 for w in weights]
    if not sum(w for w, a in zip(weights, answers) if a is not None) > 0:
        # Every valid sample got the verifier's lowest score (or an unreadable verdict): nothing to weigh by.
        weights = None
        if result.valid_samples:
            result.notes.append("verifier weights of all valid samples were 0: unweighted vote")
    result.prediction, result.distribution = vote(answers, ctx.labels, weights=weights)
    result.final_text = next((s for s, a in zip(samples, answers) if a == result.prediction), samples[0])
    return result


@register_strategy("alm_verifier", needs=("audio_verifier",))
async def alm_verifier(ctx: StrategyContext, record: EmotionRecord, n: int = 8, temperature: float = 0.8,
                       top_p: float = 1.0, max_tokens: int | None = None) -> ItemResult:
    """Best-of-N where an audio LLM hears the clip and scores each candidate (ALM-as-verifier)."""
    result = await best_of_n(ctx, record, n=n, temperature=temperature, top_p=top_p, verifier="audio",
                             max_tokens=max_tokens)
    result.strategy = "alm_verifier"
    return result


@register_strategy("weighted_alm_verifier", needs=("audio_verifier",))
async def weighted_alm_verifier(ctx: StrategyContext, record: EmotionRecord, n: int = 8, temperature: float = 0.8,
                                top_p: float = 1.0, max_tokens: int | None = None) -> ItemResult:
    """Votes weighted by an audio LLM's score of each candidate, the clip heard (weighted ALM-verifier)."""
    result = await weighted_vote(ctx, record, n=n, temperature=temperature, top_p=top_p, verifier="audio",
                                 max_tokens=max_tokens)
    result.strategy = "weighted_alm_verifier"
    return result


@register_strategy("self_refine")
async def self_refine(ctx: StrategyContext, record: EmotionRecord, rounds: int = 1,
                      max_tokens: int | None = None) -> ItemResult:
    if not ctx.prompts.refine:
        raise ValueError("self_refine needs a `refine` prompt in the prompt file")
    result = ItemResult(record.id, "self_refine")
    messages = ctx.messages(record, "cot")
    final = None
    for _ in range(rounds + 1):
        response = await ctx.ask(result, messages=messages, temperature=0.0, max_tokens=max_tokens or ctx.max_tokens)
        text = texts(response)[0]
        result.completions.append(text)
        parsed = parse(text, ctx.labels, True)
        if parsed.answer is not None:
            final = (text, parsed)
        messages = messages + [{"role": "assistant", "content": text},
                               {"role": "user", "content": ctx.prompts.refine}]
    result.total_samples = len(result.completions)
    result.valid_samples = sum(parse(t, ctx.labels, True).answer is not None for t in result.completions)
    # The last valid answer: a refinement that breaks the format does not erase a good earlier answer.
    text, parsed = final if final else (result.completions[-1], parse(result.completions[-1], ctx.labels, True))
    result.final_text, result.prediction = text, parsed.answer
    result.distribution = own_distribution(parsed, ctx.labels)
    return result


@register_strategy("budget_forcing")
async def budget_forcing(ctx: StrategyContext, record: EmotionRecord, min_thinking_tokens: int = 64,
                         max_thinking_tokens: int = 256, max_extensions: int = 2,
                         answer_tokens: int = 48) -> ItemResult:
    result = ItemResult(record.id, "budget_forcing")
    messages = ctx.messages(record, "cot")
    thinking, spent = "<think>\n", 0
    extensions = 0
    while True:
        response = await ctx.ask(
            result, messages=messages + [{"role": "assistant", "content": thinking}], temperature=0.0,
            max_tokens=max(1, max_thinking_tokens - spent), stop=["</think>"],
            extra_body={"continue_final_message": True, "add_generation_prompt": False},
        )
        piece = texts(response)[0].split("</think>")[0]
        thinking += piece
        spent += int((response.get("usage") or {}).get("completion_tokens") or 0)
        if spent >= min_thinking_tokens or spent >= max_thinking_tokens or extensions >= max_extensions:
            break
        thinking = thinking.rstrip() + " " + ctx.prompts.budget_wait + " "
        extensions += 1
    prefix = thinking.rstrip() + "\n</think>\n<answer>"
    response = await ctx.ask(
        result, messages=messages + [{"role": "assistant", "content": prefix}], temperature=0.0,
        max_tokens=answer_tokens, extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    tail = texts(response)[0]
    if "</answer>" not in tail:
        tail = tail.strip() + "</answer>" if tail.strip() and len(tail.split()) == 1 else tail
    text = prefix + tail
    result.completions = [text]
    result.total_samples = 1
    parsed = parse(text, ctx.labels, True)
    result.valid_samples = int(parsed.answer is not None)
    result.final_text, result.prediction = text, parsed.answer
    result.distribution = own_distribution(parsed, ctx.labels)
    return result


def strategy_names() -> list[str]:
    return sorted(STRATEGIES)


__all__ = ["ItemResult", "STRATEGIES", "StrategyContext", "register_strategy", "strategy_names", "vote"]
