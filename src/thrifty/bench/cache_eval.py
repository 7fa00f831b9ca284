"""`thrifty cache eval`: how often the semantic cache answers wrongly, how often it answers at all, and
how long a look-up takes with a full store.

Pairs file: one JSON object a line, `{"a", "b", "should_hit", "category"?}`; fow-cache's format
(`same_answer` instead of `should_hit`, plus `id`) is read too, and `--pairs fow-cache` finds the file
that package installs. Two phases:

1. decisions: every pair gets a scope of its own (so the labels speak about that pair alone); `a` is
   stored with a dummy answer, `b` is looked up through the full ResponseCache path (exact key, embedding,
   scoped search, guard). A hit on a pair labelled should_hit=false is a false hit.
2. latency: one scope holds every `a` plus random-vector fillers up to `--entries` (default 10,000); each
   `b` is looked up again with the embedder's memo cleared, so the time includes embedding the query,
   the exact get, the vector search over all entries and the guard. p50 / p99 in ms.

Halves: `--half tune` keeps pairs whose id ends in an even number, `--half report` the odd ones (pairs
without an id: even / odd line numbers). The guard's thresholds were chosen on `tune`; quote `report`.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from thrifty.errors import ThriftyError
from thrifty.gateway.cache.guard import GuardConfig
from thrifty.gateway.cache.keys import CacheRequest
from thrifty.gateway.cache.response_cache import ResponseCache
from thrifty.gateway.cache.store import CacheEntry


def fow_cache_pairs() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fow_cache")
    if spec is None or not spec.submodule_search_locations:
        raise ThriftyError("the fow-cache package is not installed", "pip install fow-cache==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "pairs.jsonl"


def load_pairs(path: str | Path, half: str = "all") -> list[dict[str, Any]]:
    if str(path) == "fow-cache":
        path = fow_cache_pairs()
    p = Path(path)
    if not p.exists():
        raise ThriftyError(f"pairs file {p} does not exist")
    pairs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            should = row["should_hit"] if "should_hit" in row else row["same_answer"]
            pair = {"a": str(row["a"]), "b": str(row["b"]), "should_hit": bool(should),
                    "category": row.get("category") or ("should_hit" if should else "should_miss"),
                    "id": str(row.get("id", n))}
        except (ValueError, KeyError, TypeError) as e:
            raise ThriftyError(f"{p}:{n + 1}: not a pair ({e})",
                               'each line: {"a": ..., "b": ..., "should_hit": true|false, "category": ...}') from None
        m = re.search(r"(\d+)$", pair["id"])
        number = int(m.group(1)) if m else n
        if half == "all" or (half == "tune") == (number % 2 == 0):
            pairs.append(pair)
    if half not in ("all", "tune", "report"):
        raise ThriftyError(f"unknown half {half!r}", "use tune, report or all")
    return pairs


def _request(key: str, scope: str, text: str) -> CacheRequest:
    return CacheRequest(key=key, scope=scope, namespace="eval", text=text, read=True, write=True, ttl_s=None,
                        max_age_s=None)


def _scope(tag: str) -> str:
    import hashlib

    return hashlib.sha256(tag.encode()).hexdigest()


async def _decide(cache: ResponseCache, pairs: list[dict[str, Any]], run: str) -> list[dict[str, Any]]:
    rows = []
    vectors_a = cache.embedder.embed([p["a"] for p in pairs])
    for i, (p, va) in enumerate(zip(tqdm(pairs, desc="store a", unit="pair", leave=False), vectors_a)):
        scope = _scope(f"{run}/pair/{i}")
        cache.store.put(CacheEntry(key=_scope(f"{run}/a/{i}"), scope=scope, namespace="eval", text=p["a"],
                                   response={"text": f"answer to pair {i}"}, vector=va))
    for i, p in enumerate(tqdm(pairs, desc="look up b", unit="pair", leave=False)):
        hit = await cache.lookup(_request(_scope(f"{run}/b/{i}"), _scope(f"{run}/pair/{i}"), p["b"]))
        rows.append({"id": p["id"], "category": p["category"], "should_hit": p["should_hit"],
                     "hit": hit is not None, "similarity": None if hit is None else round(hit.similarity, 4),
                     "reason": None if hit is None or hit.decision is None else hit.decision.reason,
                     "a": p["a"], "b": p["b"]})
    return rows


async def _latency(cache: ResponseCache, pairs: list[dict[str, Any]], entries: int, run: str,
                   seed: int = 0) -> list[float]:
    scope = _scope(f"{run}/shared")
    vectors_a = cache.embedder.embed([p["a"] for p in pairs])
    for i, (p, va) in enumerate(zip(pairs, vectors_a)):
        cache.store.put(CacheEntry(key=_scope(f"{run}/shared/a/{i}"), scope=scope, namespace="eval", text=p["a"],
                                   response={"text": "x"}, vector=va))
    rng = np.random.default_rng(seed)
    fill = max(0, entries - len(pairs))
    dim = cache.embedder.dim
    for j in tqdm(range(fill), desc=f"fill to {entries} entries", unit="entry", leave=False):
        v = rng.standard_normal(dim).astype(np.float32)
        cache.store.put(CacheEntry(key=_scope(f"{run}/fill/{j}"), scope=scope, namespace="eval",
                                   text=f"filler question number {j}", response={"text": "x"}, vector=v / np.linalg.norm(v)))
    cache.embedder.forget()
    times = []
    for i, p in enumerate(tqdm(pairs, desc="timed look-ups", unit="lookup", leave=False)):
        req = _request(_scope(f"{run}/shared/b/{i}"), scope, p["b"])
        t = time.perf_counter()
        await cache.lookup(req)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    should = [r for r in rows if r["should_hit"]]
    traps = [r for r in rows if not r["should_hit"]]
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in traps:
        by_cat[r["category"]].append(r)
    hits_by_cat = Counter(r["category"] for r in rows if r["hit"])
    totals = Counter(r["category"] for r in rows)
    return {
        "hit_rate": round(sum(r["hit"] for r in should) / len(should), 4) if should else None,
        "false_hit_rate": round(sum(r["hit"] for r in traps) / len(traps), 4) if traps else None,
        "false_hit_rate_by_category": {c: round(sum(r["hit"] for r in rs) / len(rs), 4)
                                       for c, rs in sorted(by_cat.items())},
        "hits_by_category": {c: f"{hits_by_cat.get(c, 0)}/{n}" for c, n in sorted(totals.items())},
    }


def evaluate(pairs_path: str | Path, store: str = "embedded", half: str = "all", entries: int = 10_000,
             redis_url: str | None = None, guard: GuardConfig | None = None, embedder=None,
             workdir: str | Path | None = None) -> dict[str, Any]:
    """Run both phases on a fresh store; returns the report (see the module doc)."""
    import tempfile

    from thrifty.gateway.cache import make_store

    pairs = load_pairs(pairs_path, half)
    if not pairs:
        raise ThriftyError(f"no pairs in {pairs_path} (half {half})")
    if embedder is None:
        from thrifty.models.embedder import Embedder

        embedder = Embedder.from_zoo()
    run = uuid.uuid4().hex[:12]
    local = None
    with tempfile.TemporaryDirectory(prefix="thrifty-cache-eval-", dir=workdir) as tmp:
        if store == "redis" and redis_url is None:
            from thrifty.gateway.cache.local_valkey import LocalValkey

            local = LocalValkey()
            redis_url = local.url
        try:
            s = make_store(store, path=Path(tmp) / "eval.sqlite3", url=redis_url, max_entries=entries + 2 * len(pairs),
                           timeout_s=2.0, prefix=f"thrifty:eval:{run}", dim=embedder.dim)
            cache = ResponseCache(s, embedder=embedder, semantic=True, guard=guard or GuardConfig(), timeout_s=2.0,
                                  name=f"{store} cache")
            try:
                rows = asyncio.run(_decide(cache, pairs, run))
                times = asyncio.run(_latency(cache, pairs, entries, run))
                size = len(s)
                s.clear()
            finally:
                s.close()
        finally:
            if local is not None:
                local.stop()
    report = {**summarize(rows), "lookup_p50_ms": round(float(np.percentile(times, 50)), 3),
              "lookup_p99_ms": round(float(np.percentile(times, 99)), 3), "pairs": len(rows),
              "half": half, "store": store, "entries_at_timing": size,
              "guard": asdict(guard or GuardConfig()),
              "wrong": [r for r in rows if r["hit"] != r["should_hit"]]}
    return report


def format_report(r: dict[str, Any]) -> str:
    lines = [f"pairs: {r['pairs']} (half: {r['half']}, store: {r['store']})",
             f"hit rate on should-hit pairs: {r['hit_rate']:.1%}" if r["hit_rate"] is not None else "",
             f"false-hit rate on traps:      {r['false_hit_rate']:.1%}" if r["false_hit_rate"] is not None else "",
             "| category | hits | false-hit rate |", "|---|---|---|"]
    for c, h in r["hits_by_category"].items():
        fhr = r["false_hit_rate_by_category"].get(c)
        lines.append(f"| {c} | {h} | {'' if fhr is None else f'{fhr:.1%}'} |")
    lines.append(f"look-up with {r['entries_at_timing']} entries, embedding included: "
                 f"p50 {r['lookup_p50_ms']:.2f} ms, p99 {r['lookup_p99_ms']:.2f} ms")
    return "\n".join(x for x in lines if x)
