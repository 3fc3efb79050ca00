"""The evaluator's side of an OpenAI-compatible endpoint: bounded concurrency, identical requests in flight sent once,
and an on-disk response cache keyed by (endpoint, model, request), so a stopped run resumes without asking anything
twice, and a run against another endpoint or model never answers from this one's cache.

Sending, the key, timeouts, retries with backoff and the checks of a reply are :class:`emoreason.data.endpoint.
ChatEndpoint`'s, the one client every stage uses: a reply that is not a chat completion (an HTML page from a gateway,
truncated JSON, JSON without choices, a choice whose ``message`` or ``content`` is null) is retried like a network
error; requests that still fail after the retries raise :class:`RequestFailed` (the data layer's
:class:`~emoreason.data.endpoint.EndpointError`), which the runner records per item (the report is still written).
Requests name the generation budget ``max_completion_tokens``; a server that refuses it is asked with ``max_tokens``.

The cache is SQLite (one row per answered request, committed as soon as the answer arrives): a run killed at any
moment loses at most the requests in flight. Only successful, non-empty answers are cached; failures and empty
answers are asked again on the next run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..data.endpoint import ChatEndpoint, EndpointError, MalformedReply, empty_reply

__all__ = ["CachedSharedChat", "EndpointClient", "MalformedReply", "RequestFailed", "ResponseCache", "request_key"]

# The evaluator's name for a request that failed for good (after all retries, or at once for errors that retrying
# cannot fix): the one client's error, with ``attempts`` and ``status``.
RequestFailed = EndpointError


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


class CachedSharedChat:
    """What :class:`EndpointClient` and :class:`~.endpoints.EndpointPool` share: ``chat`` answers from ``cache``
    when it can, sends identical requests in flight once, and stores every non-empty answer. A subclass says under
    which cache keys a request may be stored (``_keys``) and how it is sent (``_send``: the index of the key its answer
    belongs under, and the answer); it holds ``cache``, ``stats`` and ``_inflight``."""

    cache: ResponseCache | None
    stats: dict[str, Any]
    _inflight: dict[str, asyncio.Future]

    def _keys(self, request: dict) -> list[str]:
        raise NotImplementedError

    async def _send(self, request: dict) -> tuple[int, dict]:
        raise NotImplementedError

    async def chat(self, **request: Any) -> dict:
        """POST /chat/completions with ``request`` (messages, n, temperature, ...); returns the response as a dict.

        Non-OpenAI fields (``continue_final_message``...) go in ``extra_body``, as the ``openai`` client expects.
        Identical requests in flight at the same time (e.g. the first turn of ``cot_greedy`` and ``self_refine``)
        are sent once.
        """
        keys = self._keys(request)
        if self.cache is not None:
            for key in keys:
                cached = self.cache.get(key)
                if cached is not None:
                    self.stats["cache_hits"] += 1
                    return cached
        if keys[0] in self._inflight:
            self.stats["shared"] += 1
            return await asyncio.shield(self._inflight[keys[0]])
        future = asyncio.get_running_loop().create_future()
        self._inflight[keys[0]] = future
        try:
            index, response = await self._send(request)
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved here, so an unshared failure does not warn at garbage collection
            raise
        finally:
            del self._inflight[keys[0]]
        future.set_result(response)
        if self.cache is not None:
            if empty_reply(response):  # an empty answer may be a server hiccup: ask again next run
                self.stats["empty_not_cached"] += 1
            else:
                self.cache.put(keys[index], response)
        return response


class EndpointClient(CachedSharedChat):
    """One endpoint for the evaluator: its :class:`~emoreason.data.endpoint.ChatEndpoint` (``endpoint``: sending,
    retries, the model and base URL) behind :class:`CachedSharedChat`'s cache and in-flight sharing."""

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
        self.cache = cache
        self.stats = {"requests": 0, "cache_hits": 0, "shared": 0, "retries": 0, "failures": 0, "malformed": 0,
                      "empty_not_cached": 0}
        # The key is the caller's (the CLI reads $EMOREASON_API_KEY): never a stray $OPENAI_API_KEY sent to a local
        # server.
        self.endpoint = ChatEndpoint(base_url, model, api_key=api_key, timeout=timeout, max_retries=max_retries,
                                     backoff=backoff, max_backoff=max_backoff, concurrency=concurrency,
                                     stats=self.stats)
        self._inflight: dict[str, asyncio.Future] = {}

    @property
    def model(self) -> str:
        return self.endpoint.model

    @property
    def base_url(self) -> str:
        return self.endpoint.base_url

    @property
    def token_field(self) -> str:
        return self.endpoint.token_field

    async def close(self) -> None:
        await self.endpoint.aclose()

    def _keys(self, request: dict) -> list[str]:
        return [request_key(self.model, request, self.base_url)]

    async def _send(self, request: dict) -> tuple[int, dict]:
        return 0, await self.endpoint.achat(**request)
