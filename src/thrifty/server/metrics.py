"""Prometheus metrics of one server: counters and histograms it records from the gateway's outputs, gauges
read at scrape time from the engines' stats snapshots, the response cache's stats and the cost ledger.

Each app has its own registry (no module-level state), served as text at GET /metrics.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from thrifty.engine.engine import RequestOutput
    from thrifty.gateway.gateway import Gateway
    from thrifty.gateway.request import GatewayOutput, Reply

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT = 512   # finished requests whose TTFT / TPOT the dashboard's percentiles are taken over


class _EngineCollector(Collector):
    """Gauges that are read from the engines at scrape time (running / waiting, KV blocks, prefix cache),
    summed over the local tiers."""

    def __init__(self, gateway: Gateway, num_waiting: Callable[[], int]) -> None:
        self.gateway, self.num_waiting = gateway, num_waiting

    def collect(self) -> Iterator:
        snaps = self.gateway.engine_snapshots()
        running = sum(e.num_running for e in snaps)
        yield GaugeMetricFamily("thrifty_num_requests_running", "Sequences in the running batch", running)
        yield GaugeMetricFamily("thrifty_num_requests_waiting", "Requests accepted but not yet running",
                                self.num_waiting())
        total, free = sum(e.kv_blocks_total for e in snaps), sum(e.kv_blocks_free for e in snaps)
        yield GaugeMetricFamily("thrifty_kv_blocks_total", "KV cache blocks", total)
        yield GaugeMetricFamily("thrifty_kv_blocks_free", "KV cache blocks free (cached-but-unreferenced included)",
                                free)
        yield GaugeMetricFamily("thrifty_kv_blocks_used", "KV cache blocks held by requests", total - free)
        queries, hits = sum(e.prefix_cache_queries for e in snaps), sum(e.prefix_cache_hits for e in snaps)
        yield GaugeMetricFamily("thrifty_prefix_cache_hit_rate", "Prefix-cache hit tokens / query tokens",
                                hits / queries if queries else 0.0)
        yield CounterMetricFamily("thrifty_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  queries)
        yield CounterMetricFamily("thrifty_prefix_cache_hits", "Prompt tokens found in the prefix cache", hits)
        yield from _spec_decode_metrics(snaps)


def _spec_decode_metrics(snaps: list) -> Iterator:
    """Speculative decoding counters under vLLM's spec_decode names, summed over the local engines."""
    yield CounterMetricFamily("thrifty_spec_decode_num_drafts", "Verification steps that checked speculative drafts",
                              sum(e.spec_num_drafts for e in snaps))
    yield CounterMetricFamily("thrifty_spec_decode_num_draft_tokens", "Speculative draft tokens proposed",
                              sum(e.spec_num_draft_tokens for e in snaps))
    yield CounterMetricFamily("thrifty_spec_decode_num_accepted_tokens", "Speculative draft tokens accepted",
                              sum(e.spec_num_accepted_tokens for e in snaps))
    per_pos = CounterMetricFamily("thrifty_spec_decode_num_accepted_tokens_per_pos",
                                  "Speculative draft tokens accepted, by position in the draft", labels=["position"])
    width = max((len(e.spec_accepted_per_pos) for e in snaps), default=0)
    for pos in range(width):
        per_pos.add_metric([str(pos)], sum(e.spec_accepted_per_pos[pos] for e in snaps
                                           if pos < len(e.spec_accepted_per_pos)))
    yield per_pos


class _CostCollector(Collector):
    """The cost ledger's running totals of this process (thrifty.gateway.ledger), read at scrape time.
    Saved by routing can shrink (an escalated cascade pays twice), so it is a gauge, not a counter."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator:
        live = self.gateway.ledger.live
        cost = CounterMetricFamily("thrifty_cost_usd", "USD spent, by tier (escalated answers included)",
                                   labels=["tier"])
        requests = CounterMetricFamily("thrifty_tier_requests", "Requests answered, by tier", labels=["tier"])
        for name in self.gateway.names:
            t = live.get(name)
            cost.add_metric([name], t.cost_usd if t else 0.0)
            requests.add_metric([name], t.requests if t else 0)
        yield cost
        yield requests
        totals = list(live.values())
        yield CounterMetricFamily("thrifty_baseline_cost_usd", "USD the same requests would have cost on the "
                                  "baseline tier alone", sum(t.baseline_usd for t in totals))
        cache = sum(t.saved_cache_usd for t in totals)
        routing = sum(t.saved_routing_usd for t in totals)
        saved = GaugeMetricFamily("thrifty_saved_usd", "USD saved against the baseline, by reason",
                                  labels=["reason"])
        saved.add_metric(["routing"], routing)
        saved.add_metric(["cache"], cache)
        yield saved


class _CacheCollector(Collector):
    """The cache store's health, read at scrape time: errors by operation, circuit breaker state."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator:
        cache = self.gateway.cache
        if cache is None:
            return
        errors = CounterMetricFamily("thrifty_cache_store_errors", "Cache store calls that failed or timed out "
                                     "(the request was served without the cache)", labels=["op"])
        for op in ("get", "search", "put"):
            errors.add_metric([op], cache.stats.errors.get(op, 0))
        yield errors
        yield GaugeMetricFamily("thrifty_cache_breaker_open", "1 while the cache store's circuit breaker is open",
                                1 if cache.breaker.is_open else 0)
        yield CounterMetricFamily("thrifty_cache_breaker_opened", "Times the circuit breaker opened",
                                  cache.stats.breaker_opened)
        yield CounterMetricFamily("thrifty_cache_stores", "Answers written to the cache", cache.stats.stores)


class ServerMetrics:
    def __init__(self, gateway: Gateway, num_waiting: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("thrifty_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.aborted = Counter("thrifty_requests_aborted", "Generation requests aborted (client disconnected)",
                               registry=r)
        self.rejected = Counter("thrifty_requests_rejected", "Requests rejected by a server limit",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("thrifty_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("thrifty_cached_prompt_tokens",
                                     "Prompt tokens served from the prefix cache", registry=r)
        self.completion_tokens = Counter("thrifty_completion_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("thrifty_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("thrifty_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=_TPOT_BUCKETS)
        self.e2e = Histogram("thrifty_request_duration_seconds", "Generation request latency, end to end",
                             registry=r, buckets=_LATENCY_BUCKETS)
        # response cache (thrifty.gateway.cache_policy): requests by result, look-up time, tokens not computed
        self.cache_requests = Counter("thrifty_cache_requests", "Generation requests by cache result "
                                      "(hit, semantic-hit, miss, coalesced, bypass)", ["result"], registry=r)
        self.cache_served_tokens = Counter("thrifty_cache_served_tokens", "Completion tokens answered from the "
                                           "cache or a coalesced request, not computed", ["kind"], registry=r)
        self.cache_lookup = Histogram("thrifty_cache_lookup_seconds", "Cache look-up time (exact + semantic)",
                                      registry=r, buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                           0.25, 1.0))
        self.cache_similarity = Histogram("thrifty_cache_semantic_similarity", "Cosine of semantic hits",
                                          registry=r, buckets=(0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0))
        # exact percentiles of the latest requests for the dashboard (the histograms above are for Prometheus)
        self.recent_ttft: deque[float] = deque(maxlen=RECENT)
        self.recent_tpot: deque[float] = deque(maxlen=RECENT)
        r.register(_EngineCollector(gateway, num_waiting))
        r.register(_CacheCollector(gateway))
        r.register(_CostCollector(gateway))

    def observe_finished(self, out: RequestOutput, duration_s: float) -> None:
        u = out.usage
        self.prompt_tokens.inc(u.prompt_tokens)
        self.cached_tokens.inc(u.cached_tokens)
        self.completion_tokens.inc(u.completion_tokens)
        if u.time_to_first_token_s is not None:
            self.ttft.observe(u.time_to_first_token_s)
            self.recent_ttft.append(u.time_to_first_token_s)
        if u.time_per_output_token_s is not None:
            self.tpot.observe(u.time_per_output_token_s)
            self.recent_tpot.append(u.time_per_output_token_s)
        self.e2e.observe(duration_s)

    def observe_reply(self, reply: Reply) -> None:
        """The cache's part, known before the first output."""
        if reply.cache is None:
            return
        self.cache_requests.labels(reply.cache).inc()
        if reply.lookup_s is not None:
            self.cache_lookup.observe(reply.lookup_s)
        if reply.cache == "semantic-hit" and reply.similarity is not None:
            self.cache_similarity.observe(reply.similarity)

    def observe_served(self, out: GatewayOutput) -> None:
        """A final output the cache or a coalesced flight answered: tokens not computed."""
        self.cache_served_tokens.labels(out.cache).inc(out.usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
