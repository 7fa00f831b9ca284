"""ResponseCache: exact look-up, then semantic look-up (embedding + scoped search + guard), over one store.

The cache never fails a request. Every call to a remote store runs in a worker thread under `timeout_s`
(an in-process store's reads run right on the loop: see store.py); an error or a timeout counts against a
circuit breaker, and while the breaker is open the cache is skipped at no cost. Each failure and each
breaker change is logged once and counted (`stats`), which the server exports as Prometheus metrics. Writes happen in the background, after the answer went out.

The query embedding runs on the event loop's own thread, on purpose. Measured on 2 Zen 3 cores, the same
int8 MiniLM forward takes ~3.5 ms on the process's main thread but 8-10 ms on any other thread (asyncio's
default pool or a dedicated one; fp32 too; FTZ, OMP_WAIT_POLICY and re-setting the thread count did not
change it), which tripled the look-up. A few ms of a blocked loop per semantic look-up is the cheaper
price; the store's write reuses the memoised vector of the look-up.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from thrifty.gateway.cache.breaker import CircuitBreaker
from thrifty.gateway.cache.guard import Decision, Guard, GuardConfig
from thrifty.gateway.cache.keys import CacheRequest
from thrifty.gateway.cache.store import CacheEntry, CacheStore, CacheStoreError

log = logging.getLogger("thrifty.cache")
T = TypeVar("T")


@dataclass(slots=True)
class Hit:
    kind: str                      # "hit" (exact) or "semantic-hit"
    entry: CacheEntry
    similarity: float              # 1.0 for an exact hit
    decision: Decision | None = None


@dataclass(slots=True)
class CacheStats:
    lookups: Counter = field(default_factory=Counter)      # result -> count (hit, semantic-hit, miss, ...)
    errors: Counter = field(default_factory=Counter)       # store operation -> failures (timeouts included)
    served_tokens: Counter = field(default_factory=Counter)  # kind -> completion tokens answered from cache
    stores: int = 0
    breaker_opened: int = 0


class ResponseCache:
    def __init__(self, store: CacheStore, *, embedder: Any = None, semantic: bool = False,
                 guard: GuardConfig | None = None, timeout_s: float = 0.05, top_k: int = 4,
                 breaker: CircuitBreaker | None = None, name: str = "cache") -> None:
        self.store = store
        self.embedder = embedder
        self.semantic = semantic
        self.guard = Guard(guard or GuardConfig())
        self.timeout_s = timeout_s
        self.top_k = top_k
        self.name = name
        self.stats = CacheStats()
        self.breaker = breaker or CircuitBreaker()
        self.breaker.on_change = self._on_breaker
        self._background: set[asyncio.Task] = set()

    def _embed(self, text: str):
        return self.embedder.embed_one(text)  # on the loop's thread: see the module doc

    # ---- health ------------------------------------------------------------------------------------
    def _on_breaker(self, is_open: bool, reason: str) -> None:
        if is_open:
            self.stats.breaker_opened += 1
            log.warning("%s store unavailable (%s); serving without the cache for %.0f s", self.name, reason,
                        self.breaker.cooldown_s)
        else:
            log.warning("%s store is back; cache on again", self.name)

    async def _call(self, op: str, fn: Callable[[], T], inline: bool = False) -> T:
        """Run a store call in a thread under the time budget (or, `inline`, right here); CacheStoreError on
        failure or timeout."""
        if not self.breaker.allow():
            raise CacheStoreError(f"{self.name} store circuit open")
        try:
            result = fn() if inline else await asyncio.wait_for(asyncio.to_thread(fn), self.timeout_s)
        except (CacheStoreError, asyncio.TimeoutError, OSError, sqlite3.Error) as e:
            reason = "timed out" if isinstance(e, asyncio.TimeoutError) else str(e)
            self.stats.errors[op] += 1
            if not self.breaker.is_open:
                log.warning("%s store %s failed: %s", self.name, op, reason)
            self.breaker.failure(f"{op} {reason}")
            raise CacheStoreError(reason) from None
        self.breaker.success()
        return result

    # ---- look-up -----------------------------------------------------------------------------------
    async def lookup(self, req: CacheRequest) -> Hit | None:
        """The cached answer for `req`, or None (a miss, or the store is unavailable)."""
        return (await self.explain(req))[0]

    async def explain(self, req: CacheRequest) -> tuple[Hit | None, str]:
        """The look-up, with why it hit or missed (the guard's reason for the closest candidate): what
        `thrifty cache eval` records for every pair."""
        if not req.read:
            return None, "not read (no-cache)"
        inline = getattr(self.store, "in_process", False)
        try:
            entry = await self._call("get", lambda: self.store.get(req.key), inline)
            if entry is not None and self._fresh(entry, req):
                return Hit("hit", entry, 1.0), "exact"
            if not (self.semantic and req.text and self.embedder is not None):
                return None, "no exact entry; semantic off"
            vector = self._embed(req.text)
            found = await self._call("search", lambda: self.store.search(vector, self.top_k, req.scope), inline)
        except CacheStoreError as e:
            return None, f"store unavailable: {e}"
        return self.best_explained(req, found)

    def best(self, req: CacheRequest, found: list[tuple[CacheEntry, float]]) -> Hit | None:
        """The most similar candidate that the guard accepts (scope checked again: defence in depth)."""
        return self.best_explained(req, found)[0]

    def best_explained(self, req: CacheRequest, found: list[tuple[CacheEntry, float]]) -> tuple[Hit | None, str]:
        floor = self.guard.config.floor
        why = "no entry in this scope"
        for entry, sim in sorted(found, key=lambda t: -t[1]):
            if sim < floor:
                if why == "no entry in this scope":
                    why = f"closest entry below the cosine floor ({sim:.3f} < {floor})"
                break
            if entry.scope != req.scope or not self._fresh(entry, req):
                continue
            decision = self.guard.check(entry.text, req.text or "", sim)
            if decision.hit:
                return Hit("semantic-hit", entry, sim, decision), decision.reason
            if why == "no entry in this scope":
                why = decision.reason  # the closest candidate's reason speaks for the miss
        return None, why

    @staticmethod
    def _fresh(entry: CacheEntry, req: CacheRequest) -> bool:
        if entry.expired():
            return False
        return req.max_age_s is None or time.time() - entry.created <= req.max_age_s

    # ---- store -------------------------------------------------------------------------------------
    async def save(self, req: CacheRequest, response: dict[str, Any]) -> bool:
        if not req.write:
            return False
        try:
            vector = None
            if self.semantic and req.text and self.embedder is not None:
                vector = self._embed(req.text)
            now = time.time()
            entry = CacheEntry(key=req.key, scope=req.scope, namespace=req.namespace, text=req.text or "",
                               response=response, vector=vector, created=now,
                               expires_at=now + req.ttl_s if req.ttl_s else None)
            await self._call("put", lambda: self.store.put(entry))
        except CacheStoreError:
            return False
        self.stats.stores += 1
        return True

    def save_in_background(self, req: CacheRequest, response: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self.save(req, response))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background writes (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def close(self) -> None:
        self.store.close()

