"""`thrifty cache replay`: repeats in order are exact hits, the first sight of a text is a miss that stores it, and
texts past semantic_max_chars carry no text for the semantic cache (the gateway's rule)."""
from __future__ import annotations

import asyncio

from thrifty.bench.cache_replay import cache_request, replay
from thrifty.gateway.cache.embedded import EmbeddedStore
from thrifty.gateway.cache.response_cache import ResponseCache


def test_replay_counts_exact_repeats_in_order(tmp_path):
    store = EmbeddedStore(tmp_path / "c.sqlite3", dim=4)
    try:
        cache = ResponseCache(store, timeout_s=5.0)
        texts = ["what is a list?", "what is a dict?", "what is a list?", "What is a list?", "what is a list?"]
        r = asyncio.run(replay(texts, cache, semantic_max_chars=2000, chunk=2))
    finally:
        store.close()
    # case differs: another request; the third and fifth repeat the first exactly
    assert (r["requests"], r["exact_hits"], r["semantic_hits"], r["misses"]) == (5, 2, 0, 3)
    assert r["exact_hit_rate"] == 0.4 and r["semantic_examples"] == []


def test_replay_keys_match_per_text_and_long_texts_are_exact_only():
    a, b = cache_request("hello", 10), cache_request("hello", 10)
    assert a.key == b.key and a.scope == b.scope and a.text == "hello"
    assert cache_request("hello!", 10).key != a.key and cache_request("hello!", 10).scope == a.scope
    assert cache_request("x" * 11, 10).text is None
