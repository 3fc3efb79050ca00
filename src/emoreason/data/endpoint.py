"""The one client of an OpenAI-compatible chat endpoint: what the evaluator, the GRPO judge and the datagen teacher
send and how they read the reply.

:class:`ChatEndpoint` builds the request (``model`` + the caller's fields; non-OpenAI fields in ``extra_body``), sends
the key (the ``api_key`` argument, else the environment variable named by ``api_key_env``, else none), bounds each
attempt by ``timeout`` and retries, with exponential backoff and jitter (or the server's ``Retry-After``), what
retrying can fix: no connection, a timeout, 408/409/429, a 5xx, and a malformed 200 (:class:`MalformedReply`: not a
chat completion, no choices, a choice whose ``message`` or ``content`` is null). Any other 4xx means the request itself
is wrong and fails at once. Whatever fails for good raises :class:`EndpointError` (attempts, HTTP status, whether the
endpoint could not be reached at all). A server that refuses ``max_completion_tokens`` (400/422 naming it) is asked
again, not counted as an attempt, with ``max_tokens``, and the client keeps that name.

Replies come back as plain dicts (``model_dump(mode="json")``): every choice (``n`` > 1), ``usage``, ``logprobs``
where the request asked for them. :func:`empty_reply` says whether no choice has any text (a reply worth asking
again rather than caching). Both a blocking :meth:`ChatEndpoint.chat` (threads: the judge, the teacher) and an async
:meth:`ChatEndpoint.achat` (the evaluator) run the same policy; ``concurrency`` bounds the attempts in flight.

This module is light on purpose (``openai`` and the standard library): every stage may import it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from typing import Any

import openai

# Statuses that say the endpoint is unwell (busy, rate-limited, conflicting, crashed), not that the request is wrong.
TRANSIENT_STATUSES = (408, 409, 429)
TOKEN_FIELD = "max_completion_tokens"
OLD_TOKEN_FIELD = "max_tokens"


def transient_status(status: int | None) -> bool:
    """Whether a failure with this HTTP status (None: no status, e.g. no connection) is worth another attempt."""
    return status is None or status >= 500 or status in TRANSIENT_STATUSES


class MalformedReply(Exception):
    """A 200 reply that is not a chat completion (HTML, truncated JSON, no choices, a null message or content)."""


class EndpointError(RuntimeError):
    """A request that failed for good: after every retry, or at once for a refusal retrying cannot fix.

    ``attempts`` counts the requests sent; ``status`` is the last HTTP status (None: no reply, or a malformed one);
    ``cause`` names the last failure (``APIConnectionError``, ``APITimeoutError``, ``MalformedReply``,
    ``InternalServerError``, ``BadRequestError``, ...)."""

    def __init__(self, message: str, attempts: int, status: int | None = None, cause: str | None = None):
        super().__init__(message)
        self.attempts = attempts
        self.status = status
        self.cause = cause

    @property
    def unreachable(self) -> bool:
        """The last attempt could not connect at all (refused, no route; a timeout is not this)."""
        return self.cause == "APIConnectionError"

    @property
    def malformed(self) -> bool:
        """The endpoint answered, every time, with something that is not a chat completion."""
        return self.cause == "MalformedReply"

    @property
    def transient(self) -> bool:
        """The endpoint's fault (another endpoint or a later run may answer), not the request's."""
        return transient_status(self.status)


def empty_reply(response: dict) -> bool:
    """True when no choice of a reply has any text (an answer worth asking again rather than keeping)."""
    return all(not ((c.get("message") or {}).get("content") or "").strip() for c in response.get("choices") or [])


def reply_dict(completion: Any) -> dict:
    """The SDK's completion as a dict, checked: raises :class:`MalformedReply` unless every choice has text."""
    if not hasattr(completion, "model_dump"):  # the SDK returns the body as text when it is not JSON
        raise MalformedReply(f"the reply is not a chat completion: {str(completion)[:120]!r}")
    response = completion.model_dump(mode="json")
    if not isinstance(response.get("choices"), list) or not response["choices"]:
        raise MalformedReply("the reply has no choices")
    missing = [i for i, c in enumerate(response["choices"])
               if not isinstance(c, dict) or not isinstance(c.get("message"), dict)
               or not isinstance(c["message"].get("content"), str)]
    if missing:  # a 200 without text is the server's failure, not the model's answer
        raise MalformedReply(f"choice(s) {missing} of the reply have no message content (null)")
    return response


def resolve_api_key(api_key: str | None = None, api_key_env: str | None = None) -> str:
    """The key to send: ``api_key``, else ``$api_key_env``, else a placeholder (servers without auth ignore it)."""
    return api_key or (os.environ.get(api_key_env) if api_key_env else None) or "EMPTY"


def backoff_delay(attempt: int, backoff: float, max_backoff: float, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): ``backoff * 2**(attempt-1)`` with jitter (retries
    do not stampede), or what the server asked for with ``Retry-After``; never more than ``max_backoff``."""
    if retry_after is not None:
        return max(0.0, min(max_backoff, retry_after))
    return min(max_backoff, backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def _retry_after(err: BaseException) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: use our own backoff
        return None


def _refuses_token_field(err: BaseException, request: dict) -> bool:
    return (isinstance(err, openai.APIStatusError) and err.status_code in (400, 422) and TOKEN_FIELD in request
            and TOKEN_FIELD in str(err.message))


class ChatEndpoint:
    """``POST {base_url}/chat/completions`` for ``model``, with the retry policy described in the module."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 concurrency: int | None = None, stats: dict[str, Any] | None = None):
        self.base_url = base_url
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._api_key = resolve_api_key(api_key, api_key_env)
        self._concurrency = concurrency
        self._async_slots = asyncio.Semaphore(concurrency) if concurrency else None
        self._thread_slots = threading.BoundedSemaphore(concurrency) if concurrency else None
        self._sync_client: openai.OpenAI | None = None
        self._async_client: openai.AsyncOpenAI | None = None
        self._lock = threading.Lock()
        self.stats = stats if stats is not None else {}
        for name in ("requests", "retries", "failures", "malformed"):
            self.stats.setdefault(name, 0)
        self.token_field = TOKEN_FIELD  # becomes "max_tokens" for a server that refuses the new name

    # Our own retry loop (the SDK's is off), so that attempts are counted, classified and backed off the same way in
    # every stage.
    def _client_kwargs(self) -> dict:
        return dict(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0)

    @property
    def sync_client(self) -> openai.OpenAI:
        with self._lock:
            if self._sync_client is None:
                self._sync_client = openai.OpenAI(**self._client_kwargs())
            return self._sync_client

    @property
    def async_client(self) -> openai.AsyncOpenAI:
        if self._async_client is None:
            self._async_client = openai.AsyncOpenAI(**self._client_kwargs())
        return self._async_client

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _arguments(self, request: dict, extra_body: dict | None) -> dict:
        if self.token_field != TOKEN_FIELD and TOKEN_FIELD in request:
            request[self.token_field] = request.pop(TOKEN_FIELD)
        return dict(model=self.model, extra_body=extra_body, **request)

    def _after_failure(self, err: Exception, attempt: int, request: dict) -> float | None:
        """What to do after a failed attempt: None to ask again at once (not an attempt), seconds to wait before the
        next attempt, or raise :class:`EndpointError`."""
        if isinstance(err, json.JSONDecodeError):
            err = MalformedReply(f"the reply is not valid JSON ({err})")
        if _refuses_token_field(err, request):
            self.token_field = OLD_TOKEN_FIELD  # an older server: same budget, old name
            return None
        if isinstance(err, MalformedReply):
            self._count("malformed")
            status = None
        elif isinstance(err, openai.APIStatusError):
            status = err.status_code
        elif isinstance(err, openai.APIConnectionError):  # timeouts included
            status = None
        else:
            raise err  # not the endpoint's answer: a bug, let it surface as it is
        if not transient_status(status):
            self._count("failures")
            raise EndpointError(f"HTTP {status}: {err.message}", attempt, status, type(err).__name__) from None
        if attempt > self.max_retries:
            self._count("failures")
            detail = f"{err} (no reply within {self.timeout:g} s)" if isinstance(err, openai.APITimeoutError) \
                else f"{err}"
            raise EndpointError(f"{type(err).__name__} after {attempt} attempt(s): {detail}", attempt, status,
                                type(err).__name__) from None
        self._count("retries")
        return backoff_delay(attempt, self.backoff, self.max_backoff, _retry_after(err))

    def chat(self, **request: Any) -> dict:
        """Send one chat completion request (blocking); returns the checked reply as a dict."""
        request = dict(request)
        extra_body = request.pop("extra_body", None)
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._thread_slots is not None:
                    self._thread_slots.acquire()
                try:
                    self._count("requests")
                    return reply_dict(self.sync_client.chat.completions.create(**self._arguments(request,
                                                                                                 extra_body)))
                finally:
                    if self._thread_slots is not None:
                        self._thread_slots.release()
            except (openai.OpenAIError, MalformedReply, json.JSONDecodeError) as err:
                delay = self._after_failure(err, attempt, request)
            if delay is None:
                attempt -= 1
            else:
                time.sleep(delay)

    async def achat(self, **request: Any) -> dict:
        """:meth:`chat` for asyncio callers (the slot is held per attempt, never while backing off)."""
        request = dict(request)
        extra_body = request.pop("extra_body", None)
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._async_slots is not None:
                    await self._async_slots.acquire()
                try:
                    self._count("requests")
                    return reply_dict(await self.async_client.chat.completions.create(
                        **self._arguments(request, extra_body)))
                finally:
                    if self._async_slots is not None:
                        self._async_slots.release()
            except (openai.OpenAIError, MalformedReply, json.JSONDecodeError) as err:
                delay = self._after_failure(err, attempt, request)
            if delay is None:
                attempt -= 1
            else:
                await asyncio.sleep(delay)

    def close(self) -> None:
        if self._sync_client is not None:
            self._sync_client.close()

    async def aclose(self) -> None:
        self.close()
        if self._async_client is not None:
            await self._async_client.close()
