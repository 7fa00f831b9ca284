"""The live dashboard: GET /dashboard is one self-contained HTML page (no external assets); its script polls
GET /v1/thrifty/dashboard, which this module builds from the server's own Prometheus registry (one pass over
its samples, so the page and /metrics never disagree) and the latest requests' TTFT / TPOT.

Auth: the page holds no data and is public, because a browser cannot send a bearer header when it loads a page;
the JSON endpoint needs the key like the API. With a key set, the page asks for it once and sends it on its
fetches (kept in the tab's sessionStorage only).
"""
from __future__ import annotations

import time
from collections import defaultdict
from importlib import resources

from thrifty.reporting import percentile

GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
CACHE_RESULTS = ("hit", "semantic-hit", "miss", "coalesced", "bypass")


def page() -> str:
    return resources.files("thrifty.server").joinpath("static", "dashboard.html").read_text(encoding="utf-8")


def _samples(registry) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for family in registry.collect():
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def _total(samples: dict, name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, ()) if all(labels.get(k) == x for k, x in match.items()))


def _by(samples: dict, name: str, label: str) -> dict[str, float]:
    return {labels[label]: v for labels, v in samples.get(name, ()) if label in labels}


def _ms_percentiles(values) -> dict[str, float | None]:
    xs = [v * 1000 for v in values]
    return {f"p{q}": percentile(xs, q) for q in (50, 90, 99)}


def snapshot(metrics) -> dict:
    """Everything the page shows, cumulative since the server started (the page turns counts into rates)."""
    s = _samples(metrics.registry)
    requests = sum(_total(s, "thrifty_requests_total", endpoint=e) for e in GENERATION_ENDPOINTS)
    cache = {k: _total(s, "thrifty_cache_requests_total", result=k) for k in CACHE_RESULTS}
    looked_up = cache["hit"] + cache["semantic-hit"] + cache["miss"]
    drafted = _total(s, "thrifty_spec_decode_num_draft_tokens_total")
    saved = _by(s, "thrifty_saved_usd", "reason")
    spent = _total(s, "thrifty_cost_usd_total")
    baseline = _total(s, "thrifty_baseline_cost_usd_total")
    return {
        "time": time.time(),
        "requests": requests,
        "finished": _total(s, "thrifty_request_duration_seconds_count"),
        "prompt_tokens": _total(s, "thrifty_prompt_tokens_total"),
        "completion_tokens": _total(s, "thrifty_completion_tokens_total"),
        "cache_served_tokens": _total(s, "thrifty_cache_served_tokens_total"),
        "ttft_ms": _ms_percentiles(metrics.recent_ttft), "tpot_ms": _ms_percentiles(metrics.recent_tpot),
        "running": _total(s, "thrifty_num_requests_running"), "waiting": _total(s, "thrifty_num_requests_waiting"),
        "kv_blocks_used": _total(s, "thrifty_kv_blocks_used"), "kv_blocks_total": _total(s, "thrifty_kv_blocks_total"),
        "prefix_cache_hit_rate": _total(s, "thrifty_prefix_cache_hit_rate"),
        "response_cache": {**cache, "hit_rate": (cache["hit"] + cache["semantic-hit"]) / looked_up if looked_up else 0.0},
        "tiers": _by(s, "thrifty_tier_requests_total", "tier"),
        "spec": {"draft_tokens": drafted, "accepted_tokens": _total(s, "thrifty_spec_decode_num_accepted_tokens_total"),
                 "acceptance": _total(s, "thrifty_spec_decode_num_accepted_tokens_total") / drafted if drafted else None},
        "cost": {"spent_usd": spent, "baseline_usd": baseline, "saved_cache_usd": saved.get("cache", 0.0),
                 "saved_routing_usd": saved.get("routing", 0.0), "saved_usd": baseline - spent},
    }
