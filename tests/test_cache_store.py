"""The CacheStore contract, for the embedded store (SQLite + FAISS) and the Redis store (a real valkey +
RediSearch server started from PyPI packages): get / put / search in scope / TTL / LRU / namespaces."""
from __future__ import annotations

import time

import numpy as np
import pytest

from thrifty.gateway.cache import CacheEntry, CacheStoreError
from thrifty.gateway.cache.embedded import EmbeddedStore
from thrifty.gateway.cache.local_valkey import LocalValkey
from thrifty.gateway.cache.redis_store import RedisStore

DIM = 384


@pytest.fixture(scope="module")
def valkey():
    with LocalValkey() as server:
        yield server


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def entry(key: str, scope: str = "aa", vec: np.ndarray | None = None, ns: str = "default", ttl: float | None = None,
          text: str = "q") -> CacheEntry:
    now = time.time()
    return CacheEntry(key=key, scope=scope, namespace=ns, text=text, response={"text": f"answer {key}"},
                      vector=vec, created=now, expires_at=now + ttl if ttl else None)


@pytest.fixture(params=["embedded", "redis"])
def make(request, tmp_path, valkey):
    made = []

    def factory(max_entries: int = 1000):
        if request.param == "embedded":
            s = EmbeddedStore(tmp_path / "c.sqlite3", dim=DIM, max_entries=max_entries)
        else:
            s = RedisStore(valkey.url, dim=DIM, prefix=f"t{len(made)}{time.monotonic_ns()}", timeout_s=2.0,
                           max_entries=max_entries)
        made.append(s)
        return s

    yield factory
    for s in made:
        try:
            s.clear()
        except Exception:
            pass
        s.close()


def test_get_put_delete(make):
    s = make()
    assert s.get("k1") is None
    s.put(entry("k1"))
    got = s.get("k1")
    assert got is not None and got.response == {"text": "answer k1"} and got.namespace == "default"
    s.put(entry("k1", text="again"))  # overwrite
    assert s.get("k1").text == "again" and len(s) == 1
    assert s.delete("k1") and s.get("k1") is None and not s.delete("k1")


def test_search_stays_in_scope(make):
    s = make()
    v = unit(1)
    s.put(entry("mine", "aa", v))
    s.put(entry("theirs", "bb", v))          # the very same vector in another scope
    s.put(entry("exact-only", "aa"))         # no vector: never a search result
    found = s.search(v, 5, "aa")
    assert [e.key for e, _ in found] == ["mine"]
    assert found[0][1] == pytest.approx(1.0, abs=1e-3)
    assert [e.key for e, _ in s.search(v, 5, "bb")] == ["theirs"]
    assert s.search(v, 5, "cc") == []


def test_search_orders_by_similarity(make):
    s = make()
    q = unit(7)
    near = q + 0.3 * unit(8)
    s.put(entry("far", "aa", unit(9)))
    s.put(entry("near", "aa", near / np.linalg.norm(near)))
    s.put(entry("same", "aa", q))
    found = s.search(q, 3, "aa")
    assert [e.key for e, _ in found] == ["same", "near", "far"]
    assert found[0][1] > found[1][1] > found[2][1]


def test_ttl(make):
    s = make()
    s.put(entry("short", "aa", unit(1), ttl=1.0))
    s.put(entry("long", "aa", unit(2), ttl=60))
    assert s.get("short") is not None
    time.sleep(1.3)
    assert s.get("short") is None
    assert [e.key for e, _ in s.search(unit(1), 5, "aa")] == ["long"]


def test_lru_bound(make):
    s = make(max_entries=3)
    for i in range(3):
        s.put(entry(f"k{i}", "aa", unit(i)))
        time.sleep(0.01)
    s.get("k0")                               # k0 is now the most recently used
    time.sleep(0.01)
    s.put(entry("k3", "aa", unit(3)))
    assert s.get("k1") is None                # the least recently used went
    assert all(s.get(k) is not None for k in ("k0", "k2", "k3"))
    assert [e.key for e, _ in s.search(unit(1), 5, "aa")] != [] and "k1" not in [e.key for e, _ in
                                                                                   s.search(unit(1), 5, "aa")]


def test_namespaces_clear(make):
    s = make()
    s.put(entry("a1", "aa", unit(1), ns="one"))
    s.put(entry("a2", "aa", unit(2), ns="one"))
    s.put(entry("b1", "aa", unit(3), ns="two"))
    assert s.clear("one") == 2
    assert s.get("a1") is None and s.get("b1") is not None
    assert s.clear() >= 1 and s.get("b1") is None


def test_embedded_survives_restart(tmp_path):
    s = EmbeddedStore(tmp_path / "c.sqlite3", dim=DIM)
    s.put(entry("k", "aa", unit(5)))
    s.close()
    s2 = EmbeddedStore(tmp_path / "c.sqlite3", dim=DIM)
    assert s2.get("k") is not None
    assert [e.key for e, _ in s2.search(unit(5), 2, "aa")] == ["k"]
    s2.close()


def test_redis_unreachable_is_a_store_error():
    from thrifty.gateway.cache.local_valkey import free_port

    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0", dim=DIM, timeout_s=0.05)  # connects to nothing yet
    with pytest.raises(CacheStoreError):
        s.get("k")
    with pytest.raises(CacheStoreError):
        s.search(unit(1), 3, "aa")
    s.close()


def test_a_broken_in_process_store_is_a_miss_and_an_error(tmp_path):
    """The embedded store is read on the caller's thread; a failing read still only costs the cache."""
    import asyncio

    from thrifty.gateway.cache.keys import CacheRequest
    from thrifty.gateway.cache.response_cache import ResponseCache

    s = EmbeddedStore(tmp_path / "c.sqlite3", dim=DIM)
    s.put(entry("k", "aa", unit(5)))
    cache = ResponseCache(s)
    req = CacheRequest(key="k", scope="aa", namespace="default", text="q", read=True, write=False, ttl_s=None,
                       max_age_s=None)
    assert asyncio.run(cache.lookup(req)).kind == "hit"
    s._db.close()                                    # every read now raises sqlite3.ProgrammingError
    assert asyncio.run(cache.lookup(req)) is None
    assert cache.stats.errors["get"] == 1
