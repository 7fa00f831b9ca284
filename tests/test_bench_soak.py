"""`thrifty bench soak`: each request kind judged right against a tiny thrifty server over real HTTP, and the
checks catch what they are for (a 5xx, a lost request, RSS growth past warm-up, a TTFT past the deadline)."""
from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from thrifty.bench.soak import SoakConfig, checks, windows
from thrifty.bench.soak_mix import Prompts, Result, make_request, send
from thrifty.config import ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread


@pytest.fixture(scope="module")
def server(tiny_gguf):
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=512)
    app = create_app(AsyncEngine(engine), "tiny", ServerSettings(max_output_tokens=256))
    with ServerThread(app) as srv:
        srv.tokenizer = engine.tokenizer
        yield srv


def _run(server, kind: str, seed: int = 0) -> Result:
    prompts = Prompts("def f(x):\n    return x * 2\n" * 400, server.tokenizer, long_tokens=300, too_long_tokens=600)
    req = make_request(kind, "tiny", prompts, random.Random(seed))

    async def go() -> Result:
        async with httpx.AsyncClient(timeout=60) as client:
            return await send(client, server.url + "/v1/chat/completions", req, 0.0)
    return asyncio.run(go())


@pytest.mark.parametrize("kind, outcome", [("short", "completed"), ("streamed", "completed"),
                                           ("long", "completed"), ("cancelled", "cancelled")])
def test_good_requests_complete_or_are_dropped_by_the_client(server, kind, outcome):
    result = _run(server, kind)
    assert result.status == 200 and result.outcome == outcome, result
    assert result.ttft is not None


@pytest.mark.parametrize("seed", range(8))
def test_malformed_requests_are_refused_with_a_4xx(server, seed):
    result = _run(server, "malformed", seed)
    assert result.outcome == "refused" and 400 <= result.status < 500, result


def _cfg() -> SoakConfig:
    return SoakConfig("tiny", duration_s=100, deadline_s=10, warmup_s=20, window_s=50)


def test_checks_pass_a_clean_run_and_catch_each_failure():
    samples = [{"t": t, "rss_mb": 1000.0 if t <= 20 else 1030.0} for t in range(0, 100, 5)]
    good = [Result("streamed", 1.0, "completed", 200, ttft=2.0), Result("malformed", 2.0, "refused", 400),
            Result("cancelled", 3.0, "cancelled", 200, ttft=1.0), Result("long", 4.0, "rejected", 429)]
    k = checks(good, samples, _cfg())
    assert all(c["ok"] for c in k.values()), k
    assert k["rss_growth_after_warmup"]["max_growth"] == pytest.approx(0.03)
    bad = good + [Result("streamed", 5.0, "server_error", 200, ttft=None), Result("short", 6.0, "lost", 200),
                  Result("long", 7.0, "completed", 200, ttft=11.0)] * 2
    k = checks(bad, samples + [{"t": 99, "rss_mb": 1100.0}], _cfg())
    assert not any(c["ok"] for c in k.values()), k
    assert k["no_5xx"]["count"] == 2 and k["no_lost_request"]["count"] == 2
    rows = windows(bad, samples, _cfg(), 100.0)
    assert sum(w["sent"] for w in rows) == len(bad) and rows[0]["server_error"] == 2
