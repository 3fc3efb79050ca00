"""The evaluator's side of an OpenAI-compatible endpoint: bounded concurrency, retries with backoff, timeouts, and an
on-disk response cache keyed by (endpoint, model, request), so a stopped run resumes without asking anything twice,
and a run against another endpoint or model never answers from this one's cache.

The cache is SQLite (one row per answered request, committed as soon as the answer arrives): a run killed at any
moment loses at most the requests in flight. Only successful, non-empty answers are cached; failures and empty
answers are asked again on the next run. A reply that is not a chat completion (an HTML page from a gateway,
truncated JSON, JSON without choices, a choice whose ``message`` or ``content`` is null) is retried like a network
error. Requests that still fail after the retries
raise :class:`RequestFailed`, which the runner records per item (the report is still written).

Requests name the generation budget ``max_completion_tokens`` (the current OpenAI field); a server that refuses it
(HTTP 400/422 naming the field) is asked again with ``max_tokens``, and the client keeps using that name.
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


def request_key(model: str, request: dict[str, Any], endpoint: str = "") -> str:
    payload = json.dumps({"endpoint": endpoint.rstrip("/"), "model": model, "request": request}, sort_keys=True,
                         separators=(",", ":"))
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
class MalformedReply(Exception):
    """A 200 reply that is not a chat completion (HTML, truncated JSON, no choices)."""


RETRYABLE = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError, openai.InternalServerError,
             openai.ConflictError, MalformedReply)


def _empty(response: dict) -> bool:
    return all(not ((c.get("message") or {}).get("content") or "").strip() for c in response.get("choices", []))


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
        self.stats = {"requests": 0, "cache_hits": 0, "shared": 0, "retries": 0, "failures": 0, "malformed": 0,
                      "empty_not_cached": 0}
        self.token_field = "max_completion_tokens"  # becomes "max_tokens" for a server that refuses the new name
        self._inflight: dict[str, asyncio.Future] = {}

    async def close(self) -> None:
        await self._client.close()

    async def chat(self, **request: Any) -> dict:
        """POST /chat/completions with ``request`` (messages, n, temperature, ...); returns the response as a dict.

        Non-OpenAI fields (``continue_final_message``...) go in ``extra_body``, as the ``openai`` client expects.
        Identical requests in flight at the same time (e.g. the first turn of ``cot_greedy`` and ``self_refine``)
        are sent once.
        """
        key = request_key(self.model, request, self.base_url)
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
            if _empty(response):  # an empty answer may be a server hiccup: ask again next run
                self.stats["empty_not_cached"] += 1
            else:
                self.cache.put(key, response)
        return response

    async def _send(self, request: dict[str, Any]) -> dict:
        extra_body = request.pop("extra_body", None)
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._semaphore:
                    if self.token_field != "max_completion_tokens" and "max_completion_tokens" in request:
                        request[self.token_field] = request.pop("max_completion_tokens")
                    self.stats["requests"] += 1
                    try:
                        completion = await self._client.chat.completions.create(
                            model=self.model, extra_body=extra_body, **request
                        )
                    except json.JSONDecodeError as err:
                        raise MalformedReply(f"the reply is not valid JSON ({err})") from None
                if not hasattr(completion, "model_dump"):
                    raise MalformedReply(f"the reply is not a chat completion: {str(completion)[:120]!r}")
                response = completion.model_dump(mode="json")
                if not isinstance(response.get("choices"), list) or not response["choices"]:
                    raise MalformedReply("the reply has no choices")
                missing = [i for i, c in enumerate(response["choices"])
                           if not isinstance(c, dict) or not isinstance(c.get("message"), dict)
                           or not isinstance(c["message"].get("content"), str)]
                if missing:  # a 200 without text is the server's failure, not the model's wrong answer
                    raise MalformedReply(f"choice(s) {missing} of the reply have no message content (null)")
                break
            except RETRYABLE as err:
                if isinstance(err, MalformedReply):
                    self.stats["malformed"] += 1
                if attempt > self.max_retries:
                    self.stats["failures"] += 1
                    status = getattr(err, "status_code", None)
                    raise RequestFailed(f"{type(err).__name__} after {attempt} attempt(s): {err}", attempt,
                                        status) from None
                self.stats["retries"] += 1
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # jitter: retries do not stampede
            except openai.APIStatusError as err:
                if (err.status_code in (400, 422) and "max_completion_tokens" in request
                        and "max_completion_tokens" in str(err.message)):
                    self.token_field = "max_tokens"  # an older server: same budget, old name
                    attempt -= 1
                    continue
                self.stats["failures"] += 1
                raise RequestFailed(f"HTTP {err.status_code}: {err.message}", attempt, err.status_code) from None
        return response
