"""The evaluator's side of an OpenAI-compatible endpoint: bounded concurrency, retries with backoff, timeouts, and an
on-disk response cache keyed by (model, request), so a stopped run resumes without asking anything twice.

The cache is SQLite (one row per answered request, committed as soon as the answer arrives): a run killed at any
moment loses at most the requests in flight. Only successful answers are cached; failures are retried on the next
run. Requests that still fail after the retries raise :class:`RequestFailed`, which the runner records per item.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import openai


class RequestFailed(RuntimeError):
    """A request that failed after all retries (or at once, for errors that retrying cannot fix)."""

    def __init__(self, message: str, attempts: int, status: int | None = None):
        super().__init__(message)
        self.attempts = attempts
        self.status = status


def request_key(model: str, request: dict[str, Any]) -> str:
    payload = json.dumps({"model": model, "request": request}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)")

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, response: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(response)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Errors worth retrying: the network, timeouts, rate limits, server errors. A 4xx other than 408/409/429 means the
# request itself is wrong (bad audio, unknown model) and is reported at once.
RETRYABLE = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError,
             openai.ConflictError)


class EndpointClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        cache: ResponseCache | None = None,
    ):
        self.model = model
        self.base_url = base_url
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cache = cache
        self._semaphore = asyncio.Semaphore(concurrency)
        # Our own retry loop (not the client's) so that retries are counted and their backoff is ours.
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                                          max_retries=0)
        self.stats = {"requests": 0, "cache_hits": 0, "shared": 0, "retries": 0, "failures": 0}
        self._inflight: dict[str, asyncio.Future] = {}

    async def close(self) -> None:
        await self._client.close()

    async def chat(self, **request: Any) -> dict:
        """POST /chat/completions with ``request`` (messages, n, temperature, ...); returns the response as a dict.

        Non-OpenAI fields (``continue_final_message``...) go in ``extra_body``, as the ``openai`` client expects.
        Identical requests in flight at the same time (e.g. the first turn of ``cot_greedy`` and ``self_refine``)
        are sent once.
        """
        key = request_key(self.model, request)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.stats["cache_hits"] += 1
                return cached
        if key in self._inflight:
            self.stats["shared"] += 1
            return await asyncio.shield(self._inflight[key])
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            response = await self._send(dict(request))
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved here, so an unshared failure does not warn at garbage collection
            raise
        finally:
            del self._inflight[key]
        future.set_result(response)
        if self.cache is not None:
            self.cache.put(key, response)
        return response

    async def _send(self, request: dict[str, Any]) -> dict:
        extra_body = request.pop("extra_body", None)
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._semaphore:
                    self.stats["requests"] += 1
                    completion = await self._client.chat.completions.create(
                        model=self.model, extra_body=extra_body, **request
                    )
                response = completion.model_dump(mode="json")
                break
            except RETRYABLE as err:
                if attempt > self.max_retries:
                    self.stats["failures"] += 1
                    status = getattr(err, "status_code", None)
                    raise RequestFailed(f"{type(err).__name__} after {attempt} attempt(s): {err}", attempt,
                                        status) from None
                self.stats["retries"] += 1
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # jitter: retries do not stampede
            except openai.APIStatusError as err:
                self.stats["failures"] += 1
                raise RequestFailed(f"HTTP {err.status_code}: {err.message}", attempt, err.status_code) from None
        if not response.get("choices"):
            self.stats["failures"] += 1
            raise RequestFailed("the endpoint answered without choices", attempt)
        return response
