"""Response caching: exact and semantic, over one `CacheStore` (embedded SQLite + FAISS, or Redis).

    store = EmbeddedStore(path) | RedisStore(url)
    cache = ResponseCache(store, embedder=Embedder.from_zoo(), semantic=True)
    hit = await cache.lookup(build_request(...))     # Hit(kind="hit" | "semantic-hit", entry, similarity)
    await cache.save(request, {"text": ..., "finish_reason": ..., ...})

`build_cache(settings)` makes one from the config's `cache:` section.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from thrifty.gateway.cache.breaker import CircuitBreaker
from thrifty.gateway.cache.guard import Decision, Guard, GuardConfig
from thrifty.gateway.cache.keys import CacheRequest, Controls, build_request, tenant_id
from thrifty.gateway.cache.response_cache import CacheStats, Hit, ResponseCache
from thrifty.gateway.cache.store import CacheEntry, CacheStore, CacheStoreError

if TYPE_CHECKING:
    from thrifty.config import CacheSettings

__all__ = ["CacheEntry", "CacheRequest", "CacheStats", "CacheStore", "CacheStoreError", "CircuitBreaker",
           "Controls", "Decision", "Guard", "GuardConfig", "Hit", "ResponseCache", "build_cache", "build_request",
           "guard_config", "make_store", "tenant_id"]


def default_path() -> Path:
    from thrifty.paths import home

    return home() / "cache" / "responses.sqlite3"


def make_store(kind: str, *, path: str | Path | None = None, url: str | None = None, dim: int = 384,
               max_entries: int = 100_000, timeout_s: float = 0.05, prefix: str = "thrifty:cache") -> CacheStore:
    if kind == "embedded":
        from thrifty.gateway.cache.embedded import EmbeddedStore

        return EmbeddedStore(path or default_path(), dim=dim, max_entries=max_entries)
    if kind == "redis":
        from thrifty.gateway.cache.redis_store import RedisStore

        return RedisStore(url or "redis://127.0.0.1:6379/0", dim=dim, prefix=prefix, timeout_s=timeout_s,
                          max_entries=max_entries)
    raise ValueError(f"unknown cache store {kind!r}; use 'embedded' or 'redis'")


def guard_config(settings: CacheSettings) -> GuardConfig:
    return GuardConfig(same_words=settings.same_words, small_edit=settings.small_edit, reworded=settings.reworded,
                       verify_soft=settings.verify_soft)


def build_cache(settings: CacheSettings, embedder=None) -> ResponseCache | None:
    """The ResponseCache the settings describe (None when disabled). Nothing here connects to Redis."""
    if not settings.enabled:
        return None
    if settings.semantic and embedder is None:
        from thrifty.models.embedder import Embedder

        embedder = Embedder.from_zoo(settings.embedder)
    store = make_store(settings.store, path=settings.path, url=settings.url(), max_entries=settings.max_entries,
                       timeout_s=settings.timeout_s(), dim=getattr(embedder, "dim", 384))
    guard = guard_config(settings)
    breaker = CircuitBreaker(failures=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_s)
    return ResponseCache(store, embedder=embedder, semantic=settings.semantic, guard=guard,
                         timeout_s=settings.timeout_s(), breaker=breaker, name=f"{settings.store} cache")
