"""`thrifty bench gateway`: what the gateway's path costs per request on top of the engine's own time.

One local tier behind the whole policy (tenant scope, exact cache on an embedded store, coalescer, fixed
router, fallback, the cost ledger in a SQLite file), every request a cache miss (distinct prompts),
requests one at a time. A timing wrapper around the tier's backend measures the time spent inside it
(the engine's own time: its queue, steps and outputs); the request's wall time minus that is the
gateway's. The backend's prepare (tokenize and validate, once) is reported on its own line.
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
    """A backend whose generate and prepare time is summed up (`inside_s`, `prepare_s`)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.remote = inner, inner.name, inner.remote
        self.inside_s = self.prepare_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare(self, request: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.prepare(request)
        finally:
            self.prepare_s += time.perf_counter() - start

    async def generate(self, request: Any, logprobs: bool = False) -> AsyncIterator[Any]:
        gen = self.inner.generate(request, logprobs)
        try:
            while True:
                start = time.perf_counter()
                try:
                    out = await anext(gen)
                except StopAsyncIteration:
                    return
                finally:
                    self.inside_s += time.perf_counter() - start
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


async def _measure(gateway: Any, backend: TimedBackend, requests: int, max_tokens: int, warmup: int
                   ) -> dict[str, list[float]]:
    from thrifty.engine.sampling import SamplingParams
    from thrifty.gateway.request import GatewayRequest

    rows: dict[str, list[float]] = {"wall": [], "engine": [], "prepare": [], "gateway": []}
    for i in range(warmup + requests):
        request = GatewayRequest(f"bench-{i}", "local", messages=[
            {"role": "user", "content": f"Question number {i}: what is {i} plus {i * 7}?"}],
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        backend.inside_s = backend.prepare_s = 0.0
        start = time.perf_counter()
        outs = [out async for out in gateway.generate(request)]
        wall = time.perf_counter() - start
        assert outs[-1].finished and outs[-1].cache == "miss", outs[-1]
        if i >= warmup:
            rows["wall"].append(wall)
            rows["engine"].append(backend.inside_s)
            rows["prepare"].append(backend.prepare_s)
            rows["gateway"].append(wall - backend.inside_s - backend.prepare_s)
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


def format_report(report: dict) -> str:
    names = {"wall": "request, end to end", "engine": "inside the engine (its queue, steps, outputs)",
             "prepare": "backend prepare (tokenize + validate, once)",
             "gateway": "gateway path (scope, caches, coalescer, router, fallback, store, ledger)"}
    rows = [(names[k], s["p50_ms"], s["p90_ms"], s["mean_ms"]) for k, s in report["summary"].items()]
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
