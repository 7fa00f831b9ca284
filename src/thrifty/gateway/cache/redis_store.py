"""The Redis store: entries as hashes, a RediSearch vector index (FT.CREATE / FT.SEARCH KNN) over them.

Layout under a key prefix P (default "thrifty:cache"):
    P:e:<key>   hash: scope (TAG), ns (TAG, a hash of the namespace), text, resp (JSON), created, exp,
                namespace, v (float32 vector; absent for exact-only entries)
    P:lru       sorted set: key -> last use; beyond `max_entries` the least recently used are removed
    P:idx       the search index (HNSW, cosine) over P:e:*
A semantic search is `(@scope:{<scope>})=>[KNN k @v $vec]`: the scope is a filter inside the index
query, so entries of other scopes are never candidates. TTL is Redis's own (EXPIREAT).

Every call has a short socket timeout and no retries: a slow or dead server costs at most one timeout,
and the caller's circuit breaker stops calling it at all for a while. Nothing connects at construction,
so a server starts with Redis unreachable. Works with Redis Stack and with valkey + RediSearch 2.10.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np

from thrifty.gateway.cache.store import CacheEntry, CacheStoreError

_FIELDS = ("key", "scope", "namespace", "text", "resp", "created", "exp")


def _tag(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


class RedisStore:
    in_process = False

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", dim: int = 384, prefix: str = "thrifty:cache",
                 timeout_s: float = 0.05, max_entries: int = 100_000, hnsw_m: int = 16,
                 ef_runtime: int = 64) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.dim = dim
        self.prefix = prefix
        self.max_entries = max_entries
        self.hnsw_m = hnsw_m
        self.ef_runtime = ef_runtime
        self._redis_errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, protocol=2,
                                            health_check_interval=0)
        self._index_ready = False
        self._lock = threading.Lock()

    # ---- helpers -----------------------------------------------------------------------------------
    @property
    def index_name(self) -> str:
        return f"{self.prefix}:idx"

    def _k(self, key: str) -> str:
        return f"{self.prefix}:e:{key}"

    def _call(self, fn, what: str):
        try:
            return fn()
        except self._redis_errors as e:
            raise CacheStoreError(f"redis {what} failed: {type(e).__name__}: {e}") from None

    def _ensure_index(self) -> None:
        if self._index_ready:
            return
        with self._lock:
            if self._index_ready:
                return
            try:
                self._client.execute_command(
                    "FT.CREATE", self.index_name, "ON", "HASH", "PREFIX", "1", f"{self.prefix}:e:",
                    "SCHEMA", "scope", "TAG", "ns", "TAG", "v", "VECTOR", "HNSW", "8", "TYPE", "FLOAT32",
                    "DIM", str(self.dim), "DISTANCE_METRIC", "COSINE", "M", str(self.hnsw_m))
            except self._redis_errors as e:
                if "already exists" not in str(e).lower():
                    raise CacheStoreError(f"redis FT.CREATE failed: {type(e).__name__}: {e}") from None
            self._index_ready = True

    def _decode(self, fields: dict[bytes, bytes]) -> CacheEntry:
        f = {k.decode(): v for k, v in fields.items()}
        exp = f.get("exp", b"")
        return CacheEntry(key=f["key"].decode(), scope=f["scope"].decode(), namespace=f["namespace"].decode(),
                          text=f["text"].decode(), response=json.loads(f["resp"]),
                          created=float(f["created"]), expires_at=float(exp) if exp else None)

    # ---- protocol ----------------------------------------------------------------------------------
    def ping(self) -> bool:
        return bool(self._call(self._client.ping, "PING"))

    def get(self, key: str) -> CacheEntry | None:
        def run():
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(self._k(key), _FIELDS)
            pipe.zadd(f"{self.prefix}:lru", {key: time.time()}, xx=True)
            return pipe.execute()[0]

        values = self._call(run, "GET")
        if values is None or values[0] is None:
            return None
        entry = self._decode(dict(zip((f.encode() for f in _FIELDS), values)))
        return None if entry.expired() else entry

    def put(self, entry: CacheEntry) -> None:
        self._call(self._ensure_index, "FT.CREATE")
        mapping: dict[str, bytes | str] = {
            "key": entry.key, "scope": entry.scope, "ns": _tag(entry.namespace), "namespace": entry.namespace,
            "text": entry.text, "resp": json.dumps(entry.response), "created": repr(entry.created),
            "exp": "" if entry.expires_at is None else repr(entry.expires_at)}
        if entry.vector is not None:
            mapping["v"] = np.asarray(entry.vector, dtype=np.float32).tobytes()
        k = self._k(entry.key)

        def run():
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(k)
            pipe.hset(k, mapping=mapping)
            if entry.expires_at is not None:
                pipe.expireat(k, max(1, int(entry.expires_at + 0.999)))
            pipe.zadd(f"{self.prefix}:lru", {entry.key: time.time()})
            pipe.zcard(f"{self.prefix}:lru")
            return pipe.execute()[-1]

        size = self._call(run, "PUT")
        if size > self.max_entries:
            self._call(lambda: self._evict(size - self.max_entries), "EVICT")

    def _evict(self, n: int) -> None:
        old = self._client.zpopmin(f"{self.prefix}:lru", n)
        if old:
            self._client.unlink(*(self._k(k.decode()) for k, _ in old))

    def search(self, vector: np.ndarray, k: int, scope: str) -> list[tuple[CacheEntry, float]]:
        if not all(c in "0123456789abcdef" for c in scope):
            raise ValueError("a scope is a lower-case hex digest")
        self._call(self._ensure_index, "FT.CREATE")
        blob = np.asarray(vector, dtype=np.float32).tobytes()
        query = f"(@scope:{{{scope}}})=>[KNN {int(k)} @v $vec EF_RUNTIME {self.ef_runtime} AS dist]"
        args = ["FT.SEARCH", self.index_name, query, "PARAMS", "2", "vec", blob, "SORTBY", "dist",
                "RETURN", str(len(_FIELDS) + 1), *_FIELDS, "dist", "LIMIT", "0", str(int(k)), "DIALECT", "2"]

        def run():
            try:
                return self._client.execute_command(*args)
            except self._redis_errors as e:
                if "no such index" not in str(e).lower() and "unknown index" not in str(e).lower():
                    raise
                self._index_ready = False  # the server lost it (restart): create it again, once
                self._ensure_index()
                return self._client.execute_command(*args)

        reply = self._call(run, "FT.SEARCH")
        out: list[tuple[CacheEntry, float]] = []
        now = time.time()
        for i in range(1, len(reply) - 1, 2):
            raw = reply[i + 1]
            if not raw:  # the hash expired (TTL) between the index match and the load: a miss, not an error
                continue
            fields = dict(zip(raw[::2], raw[1::2]))
            entry = self._decode(fields)
            if entry.scope != scope or entry.expired(now):
                continue
            out.append((entry, 1.0 - float(fields[b"dist"])))
        return out

    def touch(self, key: str) -> None:
        self._call(lambda: self._client.zadd(f"{self.prefix}:lru", {key: time.time()}, xx=True), "TOUCH")

    def delete(self, key: str) -> bool:
        def run():
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(self._k(key))
            pipe.zrem(f"{self.prefix}:lru", key)
            return pipe.execute()[0]

        return bool(self._call(run, "DELETE"))

    def clear(self, namespace: str | None = None) -> int:
        def run() -> int:
            n = 0
            if namespace is None:
                batch = []
                for k in self._client.scan_iter(match=f"{self.prefix}:e:*", count=1000):
                    batch.append(k)
                    if len(batch) >= 1000:
                        n += self._client.unlink(*batch)
                        batch = []
                if batch:
                    n += self._client.unlink(*batch)
                self._client.unlink(f"{self.prefix}:lru")
                return n
            self._ensure_index()
            while True:
                reply = self._client.execute_command("FT.SEARCH", self.index_name, f"@ns:{{{_tag(namespace)}}}",
                                                     "NOCONTENT", "LIMIT", "0", "1000", "DIALECT", "2")
                keys = reply[1:]
                if not keys:
                    return n
                n += self._client.unlink(*keys)
                self._client.zrem(f"{self.prefix}:lru", *(k.decode().rsplit(":", 1)[-1] for k in keys))

        return self._call(run, "CLEAR")

    def __len__(self) -> int:
        return int(self._call(lambda: self._client.zcard(f"{self.prefix}:lru"), "ZCARD"))

    def close(self) -> None:
        try:
            self._client.close()
        except self._redis_errors:
            pass
