"""Several replicas of one served model as one client (``emoreason eval --endpoint URL1 --endpoint URL2``).

Each request goes to the endpoint with the least outstanding work (requests sent to it and not yet answered; ties go
round the list). A request that fails for a reason that is the endpoint's (no connection, a timeout, a 5xx, 408/409/
429, a malformed reply) takes that endpoint out for ``cooldown`` seconds and is sent again at once to another; a
request the endpoint refused as wrong (another 4xx) fails as it would with one endpoint. When every endpoint is out,
the request waits (with the client's backoff) for the first to come back, and counts that as a retry; after
``max_retries`` retries it fails as :class:`~.client.RequestFailed`, which the runner records per item.

The cache stays keyed as with one endpoint, (endpoint, model, request): an answer is stored under the endpoint that
gave it and looked up under every endpoint of the pool, so a run resumed with more, fewer or other replicas reuses
every answer of the endpoints it still lists, and a one-endpoint cache serves a pool that includes that endpoint.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from ..data.endpoint import backoff_delay, transient_status
from .client import CachedSharedChat, EndpointClient, RequestFailed, ResponseCache, request_key


def endpoint_fault(err: RequestFailed) -> bool:
    """Whether a failed request says the endpoint is unwell (try another) rather than the request is wrong: the
    statuses the one client retries (:func:`emoreason.data.endpoint.transient_status`)."""
    return transient_status(err.status)


class EndpointPool(CachedSharedChat):
    """The :class:`~.client.EndpointClient` interface (``chat``, ``close``, ``stats``, ``model``, ``base_url``,
    ``cache``) over several base URLs (``chat``, with the cache and shared requests, is
    :class:`~.client.CachedSharedChat`'s). ``concurrency`` is per endpoint: N replicas take N times the requests."""

    def __init__(self, base_urls: list[str], model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 cache: ResponseCache | None = None, cooldown: float = 30.0):
        if len(set(base_urls)) != len(base_urls) or not base_urls:
            raise ValueError(f"endpoints must be distinct and at least one, got {base_urls}")
        self.model = model
        self.base_urls = list(base_urls)
        self.base_url = self.base_urls[0]
        self.cache = cache
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cooldown = cooldown
        # One attempt per endpoint and request: the pool decides where a retry goes. The pool holds the concurrency
        # bound itself, so that a request waiting for an endpoint taken out meanwhile goes elsewhere.
        self.clients = [EndpointClient(url, model, api_key=api_key, concurrency=1 << 16, timeout=timeout,
                                       max_retries=0, cache=None) for url in self.base_urls]
        self.slots = [asyncio.Semaphore(concurrency) for _ in self.base_urls]
        self.outstanding = [0] * len(self.clients)
        self.out_until = [0.0] * len(self.clients)
        self._turn = itertools.count()
        self._inflight: dict[str, asyncio.Future] = {}
        self.stats: dict[str, Any] = {"requests": 0, "cache_hits": 0, "shared": 0, "retries": 0, "failures": 0,
                                      "failovers": 0, "empty_not_cached": 0,
                                      "endpoints": {url: {"answered": 0, "failed": 0, "taken_out": 0}
                                                    for url in self.base_urls}}

    @property
    def replicas(self) -> int:
        return len(self.clients)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    def _keys(self, request: dict) -> list[str]:
        return [request_key(self.model, request, url) for url in self.base_urls]

    def pick(self, now: float | None = None) -> int | None:
        """The endpoint in service with the least outstanding requests (ties in turn), or None if all are out."""
        now = time.monotonic() if now is None else now
        live = [i for i in range(len(self.clients)) if self.out_until[i] <= now]
        if not live:
            return None
        least = min(self.outstanding[i] for i in live)
        tied = [i for i in live if self.outstanding[i] == least]
        return tied[next(self._turn) % len(tied)]

    def take_out(self, index: int) -> None:
        self.out_until[index] = time.monotonic() + self.cooldown
        self.stats["endpoints"][self.base_urls[index]]["taken_out"] += 1

    async def _send(self, request: dict) -> tuple[int, dict]:
        retries, last = 0, None
        while True:
            index = self.pick()
            if index is None:  # every endpoint is out: wait, then try the one that comes back first
                if retries >= self.max_retries:
                    break
                retries += 1
                self.stats["retries"] += 1
                delay = backoff_delay(retries, self.backoff, self.max_backoff)
                await asyncio.sleep(min(delay, max(0.0, min(self.out_until) - time.monotonic())))
                self.out_until[self.out_until.index(min(self.out_until))] = 0.0
                continue
            url = self.base_urls[index]
            self.outstanding[index] += 1  # counted while it waits for a slot: queued work is outstanding work
            try:
                async with self.slots[index]:
                    if self.out_until[index] > time.monotonic():
                        continue  # taken out while this request waited: pick again (not a retry)
                    self.stats["requests"] += 1
                    response = await self.clients[index].chat(**request)
            except RequestFailed as err:
                if not endpoint_fault(err):
                    self.stats["failures"] += 1
                    raise
                last = err
                self.stats["endpoints"][url]["failed"] += 1
                self.take_out(index)
                if retries >= self.max_retries:
                    break
                retries += 1
                self.stats["retries"] += 1
                self.stats["failovers"] += 1
                continue
            finally:
                self.outstanding[index] -= 1
            self.stats["endpoints"][url]["answered"] += 1
            return index, response
        self.stats["failures"] += 1
        reason = f"{last}" if last is not None else "every endpoint is out of service"
        raise RequestFailed(f"all {len(self.clients)} endpoint(s) failed after {retries} retr(ies): {reason}",
                            retries + 1, getattr(last, "status", None))


def make_client(endpoint: str | list[str], model: str, **kwargs) -> EndpointClient | EndpointPool:
    """One endpoint: today's :class:`~.client.EndpointClient`; several: an :class:`EndpointPool` of them."""
    urls = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    if len(urls) == 1:
        kwargs.pop("cooldown", None)
        return EndpointClient(urls[0], model, **kwargs)
    return EndpointPool(urls, model, **kwargs)
