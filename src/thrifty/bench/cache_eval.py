"""`thrifty cache eval`: how often the semantic cache answers wrongly, how often it answers at all, and
how long a look-up takes with a full store.

Pairs file: one JSON object a line, `{"a", "b", "should_hit", "category"?, "split"?, "context_a"?,
"context_b"?}`; fow-cache's format (`same_answer` instead of `should_hit`, plus `id`) is read too. Named
sets: `fow-cache` (the file that package installs) and `traps` (thrifty's own pairs of developer
questions, `bench/data/cache_traps.jsonl`: every trap kind of the semantic-cache issue, and as many
should-hit pairs). `context_a` / `context_b`: the conversation before each question (a system prompt as a
string, or a list of chat messages); it goes into the scope exactly as the gateway puts it there. Several
sets may be given; each is reported on its own. Two phases:

1. decisions: every pair gets a scope of its own (so the labels speak about that pair alone); `a` is
   stored with a dummy answer, `b` is looked up through the full ResponseCache path (exact key, embedding,
   scoped search, guard). A hit on a pair labelled should_hit=false is a false hit. Every row records why
   it hit or missed (the guard's reason for the closest candidate, or why there was none).
2. latency: one scope holds every `a` plus random-vector fillers up to `--entries` (default 10,000); each
   `b` is looked up again with the embedder's memo cleared, so the time includes embedding the query,
   the exact get, the vector search over all entries and the guard. p50 / p99 in ms.

Halves: a row's `split` field, else `--half tune` keeps pairs whose id ends in an even number and
`--half report` the odd ones (pairs without an id: even / odd line numbers). The guard's thresholds were
chosen on `tune`; quote `report`.
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
from thrifty.gateway.cache.keys import CacheRequest, Controls, build_request, chat_parts
from thrifty.gateway.cache.response_cache import ResponseCache
from thrifty.gateway.cache.store import CacheEntry


def fow_cache_pairs() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fow_cache")
    if spec is None or not spec.submodule_search_locations:
        raise ThriftyError("the fow-cache package is not installed", "pip install fow-cache==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "pairs.jsonl"


def trap_pairs() -> Path:
    """thrifty's own labelled pairs (developer questions; traps of every kind the guard must refuse)."""
    return Path(__file__).parent / "data" / "cache_traps.jsonl"


NAMED_PAIRS = {"fow-cache": fow_cache_pairs, "traps": trap_pairs}


def load_pairs(path: str | Path, half: str = "all") -> list[dict[str, Any]]:
    if half not in ("all", "tune", "report"):
        raise ThriftyError(f"unknown half {half!r}", "use tune, report or all")
    if str(path) in NAMED_PAIRS:
        path = NAMED_PAIRS[str(path)]()
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
                    "id": str(row.get("id", n)), "context_a": _context(row.get("context_a")),
                    "context_b": _context(row.get("context_b"))}
        except (ValueError, KeyError, TypeError) as e:
            raise ThriftyError(f"{p}:{n + 1}: not a pair ({e})",
                               'each line: {"a": ..., "b": ..., "should_hit": true|false, "category": ...}') from None
        if half == "all" or _split(row, pair["id"], n) == half:
            pairs.append(pair)
    return pairs


def _split(row: dict[str, Any], pair_id: str, line: int) -> str:
    """The row's `split` field, else by its id's trailing number (even: tune), else by line number."""
    if row.get("split") in ("tune", "report"):
        return row["split"]
    m = re.search(r"(\d+)$", pair_id)
    number = int(m.group(1)) if m else line
    return "tune" if number % 2 == 0 else "report"


def _context(value: Any) -> list[dict[str, Any]]:
    """A pair's conversation before the question: a list of chat messages, or a system prompt as a string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def _request(key: str, scope: str, text: str) -> CacheRequest:
    return CacheRequest(key=key, scope=scope, namespace="eval", text=text, read=True, write=True, ttl_s=None,
                        max_age_s=None)


def _scope(tag: str) -> str:
    import hashlib

    return hashlib.sha256(tag.encode()).hexdigest()


def _pair_scope(tag: str, context: list[dict[str, Any]], text: str) -> str:
    """The scope the gateway would give this question after `context` (a chat), salted by `tag` so that
    every pair has scopes of its own."""
    _, ctx = chat_parts(context + [{"role": "user", "content": text}])
    return build_request(tenant=tag, namespace="eval", model="eval", endpoint="chat", prompt_ids=[], context=ctx,
                         text=text, params={}, controls=Controls(), default_ttl_s=None).scope


async def _decide(cache: ResponseCache, pairs: list[dict[str, Any]], run: str) -> list[dict[str, Any]]:
    rows = []
    vectors_a = cache.embedder.embed([p["a"] for p in pairs])
    for i, (p, va) in enumerate(zip(tqdm(pairs, desc="store a", unit="pair", leave=False), vectors_a)):
        scope = _pair_scope(f"{run}/pair/{i}", p.get("context_a") or [], p["a"])
        cache.store.put(CacheEntry(key=_scope(f"{run}/a/{i}"), scope=scope, namespace="eval", text=p["a"],
                                   response={"text": f"answer to pair {i}"}, vector=va))
    for i, p in enumerate(tqdm(pairs, desc="look up b", unit="pair", leave=False)):
        scope = _pair_scope(f"{run}/pair/{i}", p.get("context_b") or [], p["b"])
        hit, why = await cache.explain(_request(_scope(f"{run}/b/{i}"), scope, p["b"]))
        rows.append({"set": p.get("set", ""), "id": p["id"], "category": p["category"],
                     "should_hit": p["should_hit"], "hit": hit is not None,
                     "similarity": None if hit is None else round(hit.similarity, 4), "reason": why,
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
    """Hit rate on should-hit pairs, false-hit rate on traps, both per category, and why pairs missed."""
    should = [r for r in rows if r["should_hit"]]
    traps = [r for r in rows if not r["should_hit"]]
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    return {
        "pairs": len(rows),
        "hit_rate": _rate(should),
        "false_hit_rate": _rate(traps),
        "hit_rate_by_category": {c: _rate(rs) for c, rs in sorted(by_cat.items()) if rs[0]["should_hit"]},
        "false_hit_rate_by_category": {c: _rate(rs) for c, rs in sorted(by_cat.items()) if not rs[0]["should_hit"]},
        "hits_by_category": {c: f"{sum(r['hit'] for r in rs)}/{len(rs)}" for c, rs in sorted(by_cat.items())},
        "reasons_by_category": {c: dict(Counter(_reason_kind(r["reason"]) for r in rs).most_common())
                                for c, rs in sorted(by_cat.items())},
    }


def _rate(rows: list[dict[str, Any]]) -> float | None:
    return round(sum(r["hit"] for r in rows) / len(rows), 4) if rows else None


def _reason_kind(reason: str | None) -> str:
    """A reason without the words it quotes ("name 'c' only in ..." -> "name only in ..."), for counting."""
    return re.sub(r"\s*'[^']*'|\s*\([^)]*\)|:.*$", "", reason or "").strip()


def evaluate(pairs_path: str | Path | list[str | Path], store: str = "embedded", half: str = "all",
             entries: int = 10_000, redis_url: str | None = None, guard: GuardConfig | None = None, embedder=None,
             workdir: str | Path | None = None) -> dict[str, Any]:
    """Run both phases on a fresh store; returns the report (see the module doc): the rates over all pairs,
    and under `sets` the same for each pairs file on its own."""
    import tempfile

    from thrifty.gateway.cache import make_store

    paths = pairs_path if isinstance(pairs_path, list) else [pairs_path]
    pairs = []
    for path in paths:
        got = load_pairs(path, half)
        if not got:
            raise ThriftyError(f"no pairs in {path} (half {half})")
        pairs += [{**p, "set": str(path)} for p in got]
    if embedder is None:
        from thrifty.models.embedder import Embedder

        embedder = Embedder.from_zoo()
    guard = guard or GuardConfig()
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
            cache = ResponseCache(s, embedder=embedder, semantic=True, guard=guard, timeout_s=2.0,
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
    return {**summarize(rows), "sets": {str(p): summarize([r for r in rows if r["set"] == str(p)]) for p in paths},
            "lookup_p50_ms": round(float(np.percentile(times, 50)), 3),
            "lookup_p99_ms": round(float(np.percentile(times, 99)), 3),
            "half": half, "store": store, "entries_at_timing": size, "guard": asdict(guard),
            "wrong": [r for r in rows if r["hit"] != r["should_hit"]]}


def format_report(r: dict[str, Any]) -> str:
    g = r["guard"]
    lines = [f"half: {r['half']}, store: {r['store']}, guard: same_words {g['same_words']}, "
             f"small_edit {g['small_edit']}, reworded {g['reworded']}"]
    for name, s in r["sets"].items():
        lines += ["", f"## {name}: {s['pairs']} pairs",
                  f"hit rate on should-hit pairs: {_pct(s['hit_rate'])}; false-hit rate on traps: "
                  f"{_pct(s['false_hit_rate'])}",
                  "| category | kind | hits | rate | reasons (count) |", "|---|---|---|---|---|"]
        for c, h in s["hits_by_category"].items():
            kind, rate = (("should hit", s["hit_rate_by_category"][c]) if c in s["hit_rate_by_category"]
                          else ("trap", s["false_hit_rate_by_category"][c]))
            reasons = ", ".join(f"{k} ({n})" for k, n in list(s["reasons_by_category"][c].items())[:4])
            lines.append(f"| {c} | {kind} | {h} | {_pct(rate)} | {reasons} |")
    lines += ["", f"look-up with {r['entries_at_timing']} entries, embedding included: "
                  f"p50 {r['lookup_p50_ms']:.2f} ms, p99 {r['lookup_p99_ms']:.2f} ms"]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"
