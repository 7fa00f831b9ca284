"""`thrifty cache replay`: ShareGPT's first turns through the response cache in the file's order, as one tenant's
traffic: each question is looked up (exact, then semantic behind the trap guard) and, on a miss, stored. What
repeats exactly, and what the semantic cache serves beyond that, is this public traffic's answer to the seed's
"15-30 % exact, 10-20 % more semantic" on production traffic.

The keys are the gateway's own (`build_request`, as `CachePolicy.plan` builds them for a single-turn chat at
temperature 0 on one model): the exact key over the request's bytes, the semantic scope over the (empty) context,
texts longer than `semantic_max_chars` exact-only. No model runs: which request hits depends only on the keys, the
embeddings and the guard, never on the answers, so each stored answer is a placeholder.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from thrifty.config import CacheSettings
from thrifty.gateway.cache.keys import CacheRequest, Controls, build_request
from thrifty.gateway.cache.response_cache import ResponseCache

EXAMPLES = 25   # semantic hits shown in the table, spread over the run (the JSON keeps every one)


def cache_request(text: str, semantic_max_chars: int) -> CacheRequest:
    """The keys the gateway gives a one-message chat of `text` (one tenant, one model, temperature 0)."""
    messages = [{"role": "user", "content": text}]
    ids = list(json.dumps(messages, sort_keys=True).encode())
    return build_request(tenant="replay", namespace="replay", model="replay", endpoint="chat", prompt_ids=ids,
                         context=[], text=text if len(text) <= semantic_max_chars else None,
                         params={"temperature": 0.0}, controls=Controls(), default_ttl_s=None)


async def replay(texts: list[str], cache: ResponseCache, semantic_max_chars: int, chunk: int = 256) -> dict[str, Any]:
    """Look each text up in order, store it on a miss; counts by outcome and every semantic hit."""
    counts: Counter = Counter()
    examples = []
    for start in range(0, len(texts), chunk):
        batch = texts[start:start + chunk]
        if cache.semantic:   # one batched forward fills the embedder's memo; look-ups then read it
            cache.embedder.embed([t for t in batch if len(t) <= semantic_max_chars])
        for text in batch:
            req = cache_request(text, semantic_max_chars)
            hit, _ = await cache.explain(req)
            if hit is None:
                counts["miss"] += 1
                await cache.save(req, {"text": "(placeholder)"})
                continue
            counts[hit.kind] += 1
            if hit.kind != "hit":
                examples.append({"query": text[:300], "served": hit.entry.text[:300],
                                 "similarity": round(hit.similarity, 4)})
    n = len(texts)
    return {"requests": n, "exact_hits": counts["hit"], "semantic_hits": counts["semantic-hit"],
            "misses": counts["miss"], "exact_hit_rate": counts["hit"] / n if n else None,
            "semantic_hit_rate": counts["semantic-hit"] / n if n else None,
            "semantic_examples": examples}


def run_replay(num_prompts: int | None = None, path: str | Path | None = None, semantic: bool = True,
               embedder=None) -> dict[str, Any]:
    """The replay over the first `num_prompts` first turns of the ShareGPT file (all when None)."""
    from thrifty.bench.sharegpt import load_turns
    from thrifty.gateway.cache import guard_config, make_store

    turns, info = load_turns(path)
    texts = [t.prompt for t in turns[:num_prompts]]
    settings = CacheSettings()
    if semantic and embedder is None:
        from thrifty.models.embedder import Embedder

        embedder = Embedder.from_zoo(memo_size=1024)
    with tempfile.TemporaryDirectory(prefix="thrifty-cache-replay-") as tmp:
        store = make_store("embedded", path=Path(tmp) / "replay.sqlite3", max_entries=len(texts) + 1,
                           timeout_s=10.0, dim=embedder.dim if embedder else 384)
        try:
            cache = ResponseCache(store, embedder=embedder, semantic=semantic, guard=guard_config(settings), timeout_s=10.0,
                                  name="replay cache")
            result = asyncio.run(replay(texts, cache, settings.semantic_max_chars))
        finally:
            store.close()
    return {"benchmark": "cache-replay", "dataset": info, "semantic": semantic,
            "guard": asdict(guard_config(settings)),
            "semantic_max_chars": settings.semantic_max_chars, **result}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"## cache replay: {r['requests']} ShareGPT first turns in the file's order, one tenant",
             f"exact hits {r['exact_hits']} ({r['exact_hit_rate'] * 100:.2f} %), semantic hits beyond them "
             f"{r['semantic_hits']} ({r['semantic_hit_rate'] * 100:.2f} %), misses {r['misses']}"]
    shown = r["semantic_examples"]
    if len(shown) > EXAMPLES:   # evenly spaced, so the greetings that come first do not fill the table
        shown = [shown[i * len(shown) // EXAMPLES] for i in range(EXAMPLES)]
    lines.append(f"{len(shown)} of the {len(r['semantic_examples'])} semantic hits, for a person to judge:")
    lines += [f"- {e['similarity']:.3f}: {e['query'][:80]!r} <- {e['served'][:80]!r}" for e in shown]
    return "\n".join(lines)
