"""`thrifty bench gateway`: what the gateway's path costs per request on top of the engine's own time.

One local tier behind the whole policy (tenant scope, exact cache on an embedded store, coalescer, fixed
router, fallback, the cost ledger in a SQLite file), every request a cache miss (distinct prompts),
requests one at a time. A timing wrapper around the tier's backend splits each request's wall time (until
the caller has the last output) into

- prepare: the backend tokenizes and validates the request (once; work the engine would do anyway);
- before the engine: scope, exact cache look-up, coalescer, router and fallback, up to the backend's start;
- the engine: from the backend's start to its last output (its queue, steps and outputs; handing each
  output on happens while the engine computes the next);
- after the engine: booking the cost, tagging, scheduling the cache store, until the caller has the output.

The gateway's added latency is before + after. The same prompts sent
straight to the AsyncEngine (token ids in, no gateway) give the engine alone, for comparison.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

from thrifty.bench.report import markdown_table, write_json
from thrifty.bench.stats import hardware_info, now_iso, percentile


class TimedBackend:
    """A backend that notes when it starts, when its last output leaves it, and how long prepare took."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.remote = inner, inner.name, inner.remote
        self.prepare_s = self.started = self.last_out = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare(self, request: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.prepare(request)
        finally:
            self.prepare_s += time.perf_counter() - start

    async def generate(self, request: Any, logprobs: bool = False) -> AsyncIterator[Any]:
        self.started = time.perf_counter()
        gen = self.inner.generate(request, logprobs)
        try:
            async for out in gen:
                self.last_out = time.perf_counter()
                yield out
        finally:
            await gen.aclose()


def build(model: str, folder: Path, engine_options: dict[str, Any]) -> tuple[Any, TimedBackend]:
    """A gateway with one timed local tier, the exact cache and a ledger file under `folder`."""
    from thrifty.config import CacheSettings, RouterSettings
    from thrifty.engine.async_engine import AsyncEngine
    from thrifty.engine.engine import LLMEngine
    from thrifty.gateway.backends import LocalBackend
    from thrifty.gateway.cache import ResponseCache
    from thrifty.gateway.cache.embedded import EmbeddedStore
    from thrifty.gateway.costs import Price
    from thrifty.gateway.gateway import Gateway, Tier
    from thrifty.gateway.ledger import Ledger
    from thrifty.gateway.router import FixedRouter

    engine = LLMEngine.from_model(model, **engine_options)
    backend = TimedBackend(LocalBackend("local", AsyncEngine(engine), model))
    cache = ResponseCache(EmbeddedStore(folder / "responses.sqlite3"), timeout_s=2.0)
    gateway = Gateway([Tier("local", backend, Price(0.1, 0.01, 0.4))], FixedRouter("local"),
                      RouterSettings(retries=0), Ledger(folder / "ledger.sqlite3"), cache, CacheSettings())
    return gateway, backend


def _request(i: int, max_tokens: int) -> Any:
    from thrifty.engine.sampling import SamplingParams
    from thrifty.gateway.request import GatewayRequest

    return GatewayRequest(f"bench-{i}", "local", messages=[
        {"role": "user", "content": f"Question number {i}: what is {i} plus {i * 7}?"}],
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


async def _through_gateway(gateway: Any, backend: TimedBackend, i: int, max_tokens: int) -> dict[str, float]:
    backend.prepare_s = 0.0
    start = time.perf_counter()
    done = None
    async for out in gateway.generate(_request(i, max_tokens)):
        if out.finished:
            done = time.perf_counter()
            assert out.cache == "miss", out.cache
    wall, before = done - start, backend.started - start - backend.prepare_s
    engine, after = backend.last_out - backend.started, done - backend.last_out
    return {"wall": wall, "prepare": backend.prepare_s, "before": before, "engine": engine, "after": after,
            "added": before + after}


async def _engine_alone(backend: TimedBackend, i: int, max_tokens: int) -> float:
    prepared = backend.inner.prepare(_request(i, max_tokens))
    start = time.perf_counter()
    async for out in backend.engine.generate(prepared.prompt_ids, prepared.params, request_id=f"alone-{i}"):
        if out.finished:
            return time.perf_counter() - start
    raise RuntimeError("the engine ended without a final output")


async def _measure(gateway: Any, backend: TimedBackend, requests: int, max_tokens: int, warmup: int
                   ) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    for i in range(warmup + requests):
        row = await _through_gateway(gateway, backend, i, max_tokens)
        row["engine alone"] = await _engine_alone(backend, i + warmup + requests, max_tokens)
        if i >= warmup:
            for name, value in row.items():
                rows.setdefault(name, []).append(value)
    await gateway.close()
    return rows


def run_gateway_bench(model: str, requests: int = 50, max_tokens: int = 8, warmup: int = 3,
                      engine_options: dict[str, Any] | None = None) -> dict:
    options = {"kv_cache_memory": 0.25, "max_num_seqs": 4, **(engine_options or {})}
    with tempfile.TemporaryDirectory() as tmp:
        gateway, backend = build(model, Path(tmp), options)
        rows = asyncio.run(_measure(gateway, backend, requests, max_tokens, warmup))
    summary = {name: {"p50_ms": percentile(v, 50) * 1e3, "p90_ms": percentile(v, 90) * 1e3,
                      "mean_ms": sum(v) / len(v) * 1e3} for name, v in rows.items()}
    return {"benchmark": "gateway", "created": now_iso(), "hardware": hardware_info(), "model": model,
            "config": {"requests": requests, "max_tokens": max_tokens, "warmup": warmup, "engine": options},
            "summary": summary, "samples_ms": {k: [x * 1e3 for x in v] for k, v in rows.items()}}


NAMES = {"wall": "request through the gateway, end to end", "engine alone": "the same request, engine alone",
         "prepare": "backend prepare (tokenize + validate, once)",
         "before": "gateway before the engine (scope, cache look-up, coalescer, router, fallback)",
         "engine": "the engine (its queue, steps, outputs)",
         "after": "gateway after the engine (ledger, tags, cache store)",
         "added": "gateway's added latency (before + after)"}


def format_report(report: dict) -> str:
    rows = [(NAMES[k], report["summary"][k]["p50_ms"], report["summary"][k]["p90_ms"], report["summary"][k]["mean_ms"])
            for k in NAMES]
    c = report["config"]
    return (f"gateway overhead, {c['requests']} cache-miss requests one at a time, {c['max_tokens']} tokens each, "
            f"{report['model']} on {report['hardware'].get('cpu', '?')}\n\n"
            + markdown_table(("ms per request", "p50", "p90", "mean"), rows))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="per-request overhead of the gateway path beside the engine's own time")
    p.add_argument("--model", required=True, help="zoo name, .gguf file or Hugging Face folder")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")


def run(args: argparse.Namespace) -> None:
    options = {"dtype": args.dtype, "num_threads": args.threads}
    report = run_gateway_bench(args.model, args.requests, args.max_tokens, engine_options=options)
    print(format_report(report))
    if args.json:
        print(f"\nwrote {write_json(args.json, report)}")
