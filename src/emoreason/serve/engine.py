"""The transformers backend: a batching queue in front of ``model.generate``.

Concurrent requests that share their decoding settings are stacked into one left-padded batch (each request
contributes ``n`` rows), so eight clients cost about one ``generate`` call, not eight, seeded or not. Sampling draws
from one generator per row (Gumbel-max: the argmax of the warped scores plus Gumbel noise from the row's generator is
a draw from the softmax), seeded from the request's ``seed`` and the row's index, so a seeded request gives the same
completions whatever else is in its batch (up to the float effects of padding), and no request reseeds torch.
``generate`` runs in one worker thread, so the event loop keeps accepting (and validating) requests meanwhile.

A request whose client goes away is cancelled: its rows stop at the next decoding step (a stopping criterion reads
each row's cancel flag), so one abandoned long request cannot hold the generation thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class PreparedRequest:
    """A validated request: the rendered prompt (with one `<audio>` per clip) and its decoded clips."""

    prompt: str
    clips: list[np.ndarray]
    params: SamplingParams
    n: int = 1
    # Set (from the event loop) when the client is gone; generation reads it between decoding steps.
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Choice:
    text: str
    finish_reason: str
    token_ids: list[int]
    logprobs: list[dict] | None = None


@dataclass
class GenerationResult:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Job:
    request: PreparedRequest
    future: asyncio.Future
    key: tuple = field(default=())


class _CancelledRows(StoppingCriteria):
    """Stops the rows whose request was cancelled (the others in the batch go on)."""

    def __init__(self, rows: list[threading.Event]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        flags = [event.is_set() for event in self.rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class _RowSampler(LogitsProcessor):
    """Adds Gumbel noise drawn from each row's own generator: greedy decoding over the result samples every row from
    its warped distribution, independently of the other rows of the batch."""

    def __init__(self, seeds: list[int]):
        self.seeds = seeds
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                               for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))
        return scores.float() + gumbel


def row_seed(seed: int | None, row: int) -> int:
    """The generator seed of row ``row`` of a request: derived from its ``seed`` (random without one)."""
    if seed is None:
        return secrets.randbits(63)
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:8], "little") >> 1


def batch_key(params: SamplingParams) -> tuple:
    """Requests batch together only when one ``generate`` call can serve them all exactly (seeds need not match:
    every row samples from its own generator)."""
    sampling = () if params.greedy else (params.temperature, params.top_p)
    return (params.greedy, sampling, params.max_tokens, params.stop)


class TransformersEngine:
    def __init__(self, model, processor, max_batch_rows: int = 16, batch_wait_s: float = 0.005,
                 num_threads: int | None = None):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_rows = max_batch_rows
        self.batch_wait_s = batch_wait_s
        # On a busy CPU, torch's default of one thread per core oversubscribes it: a tiny model's generate ran
        # 8-15x slower with 2 threads than with 1 while other jobs shared the 2 cores. `num_threads` sets it.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="generate",
            initializer=torch.set_num_threads if num_threads else None, initargs=(num_threads,) if num_threads else (),
        )
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()
        self.batches_run = 0  # counters for /health and the throughput benchmark
        self.rows_run = 0
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if not self.eos_ids and self.tokenizer.eos_token_id is not None:
            self.eos_ids = {self.tokenizer.eos_token_id}
        self.pad_id = model.generation_config.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.cancelled_rows = 0  # rows stopped early because their client went away

    @property
    def max_model_len(self) -> int:
        """The language model's context (prompt + completion tokens)."""
        text_config = getattr(self.model.config, "text_config", self.model.config)
        return int(getattr(text_config, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    @property
    def max_audio_seconds(self) -> float:
        """The longest clip the content encoder hears whole (Whisper's window: 30 s)."""
        return self.processor.max_samples / 16_000

    def count_prompt_tokens(self, prompt: str, clips: list[np.ndarray]) -> int:
        """Tokens the prompt takes once each `<audio>` is expanded to its clip's token count."""
        text_tokens = len(self.tokenizer(prompt)["input_ids"])
        return text_tokens + sum(self.processor.num_audio_tokens(len(c)) - 1 for c in clips)

    @classmethod
    def from_pretrained(cls, path, dtype: str | None = None, **kwargs) -> TransformersEngine:
        from ..modeling import load_pretrained

        load_kwargs = {"dtype": getattr(torch, dtype)} if dtype and dtype != "auto" else {}
        model, processor = load_pretrained(path, **load_kwargs)
        return cls(model, processor, **kwargs)

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: PreparedRequest) -> GenerationResult:
        if self._queue is None:
            raise RuntimeError("engine not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(request, future, batch_key(request.params)))
        try:
            return await future
        except asyncio.CancelledError:
            request.cancelled.set()  # the caller gave up: stop its rows if they are being generated
            raise

    # -- batching ---------------------------------------------------------------------------------------------
    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[_Job] = []
        while True:
            if not pending:
                pending.append(await self._queue.get())
                await asyncio.sleep(self.batch_wait_s)  # let requests sent together arrive together
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            pending = [job for job in pending if not (job.future.cancelled() or job.request.cancelled.is_set())]
            if not pending:
                continue
            batch, rest, rows = [], [], 0
            key = pending[0].key
            for job in pending:
                if job.key == key and (not batch or rows + job.request.n <= self.max_batch_rows):
                    batch.append(job)
                    rows += job.request.n
                else:
                    rest.append(job)
            pending = rest
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self.generate, [j.request for j in batch])
        except Exception as err:  # a failed batch fails its requests, never the server
            if len(batch) > 1:
                # Run them one by one, so that only the request that breaks generation fails.
                for job in batch:
                    await self._run(loop, [job])
                return
            logger.exception("generation failed")
            if not batch[0].future.done():
                batch[0].future.set_exception(err)
            return
        for job, result in zip(batch, results):
            if not job.future.done():
                job.future.set_result(result)

    # -- generation -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: list[PreparedRequest]) -> list[GenerationResult]:
        """Run one left-padded ``generate`` call for requests that share their decoding settings."""
        params = requests[0].params
        texts, clips, cancel_flags, seeds = [], [], [], []
        for req in requests:
            for row in range(req.n):
                texts.append(req.prompt)
                clips.extend(req.clips)
                cancel_flags.append(req.cancelled)
                seeds.append(row_seed(req.params.seed, row))
        inputs = self.processor(text=texts, audio=clips or None, padding_side="left")
        inputs = inputs.to(self.model.device)
        if "input_features" in inputs:
            inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
            inputs["input_values"] = inputs["input_values"].to(self.model.dtype)
        want_logprobs = any(r.params.logprobs for r in requests)
        kwargs = dict(max_new_tokens=params.max_tokens, return_dict_in_generate=True, output_logits=want_logprobs,
                      pad_token_id=self.pad_id, stopping_criteria=StoppingCriteriaList([_CancelledRows(cancel_flags)]))
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:  # sampled through greedy decoding over per-row Gumbel-perturbed scores (see _RowSampler)
            warpers = [TemperatureLogitsWarper(params.temperature)]
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                          logits_processor=LogitsProcessorList([*warpers, _RowSampler(seeds)]))
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        with self._lock:
            out = self.model.generate(**inputs, **kwargs)
        self.batches_run += 1
        self.rows_run += len(texts)
        self.cancelled_rows += sum(flag.is_set() for flag in cancel_flags)
        prompt_len = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(-1).tolist()
        generated = out.sequences[:, prompt_len:].tolist()
        logprob_rows = None
        if want_logprobs:
            # Raw model log-probabilities (before temperature / top-p), as vLLM reports by default.
            logprob_rows = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        results, row = [], 0
        for req in requests:
            choices = []
            for _ in range(req.n):
                choices.append(self._choice(generated[row], req.params, logprob_rows[row] if req.params.logprobs
                                            and logprob_rows is not None else None))
                row += 1
            results.append(GenerationResult(
                choices=choices, prompt_tokens=int(prompt_tokens[row - 1]),
                completion_tokens=sum(len(c.token_ids) for c in choices),
            ))
        return results

    def _choice(self, ids: list[int], params: SamplingParams, logprobs: torch.Tensor | None) -> Choice:
        length, finish = len(ids), "length"
        for i, tok in enumerate(ids):
            if tok in self.eos_ids:
                length, finish = i + 1, "stop"
                break
            if tok == self.pad_id:  # rows stopped by a stop string are padded afterwards
                length, finish = i, "stop"
                break
        ids = ids[:length]
        text_ids = [t for t in ids if t not in self.eos_ids]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        if params.stop:
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        token_logprobs = None
        if logprobs is not None:
            token_logprobs = [self._token_logprob(tok, logprobs[i], params.top_logprobs) for i, tok in enumerate(ids)]
        return Choice(text=text, finish_reason=finish, token_ids=ids, logprobs=token_logprobs)

    def _token_entry(self, token_id: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}

    def _token_logprob(self, token_id: int, row: torch.Tensor, top: int) -> dict:
        entry = self._token_entry(token_id, row[token_id].item())
        entry["top_logprobs"] = []
        if top > 0:
            values, indices = row.topk(top)
            entry["top_logprobs"] = [self._token_entry(i, v) for v, i in zip(values.tolist(), indices.tolist())]
        return entry

    def num_prompt_placeholders(self, prompt: str) -> int:
        return prompt.count(self.processor.audio_token)
