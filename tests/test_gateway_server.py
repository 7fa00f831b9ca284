"""The gateway in the server, over real HTTP: a local tiny-model tier and a remote tier that is a second thrifty
server on loopback standing in for a cloud API (its API key read from an environment variable). `model: auto`
routes (route and cost headers seen through the official openai SDK), tiers are pinned by name, the remote
tier streams and returns logprobs, a tier that is down falls back, the key never shows in errors or logs,
cache hits cost nothing, and the ledger adds up in GET /v1/thrifty/report and /metrics."""
from __future__ import annotations

import asyncio
import logging
import re
import socket
import time

import httpx
import openai
import pytest

from thrifty.config import CacheSettings, PriceSettings, RouterSettings, ServerSettings, ThriftyConfig, TierSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.gateway.backends import BackendError
from thrifty.gateway.remote import RemoteBackend
from thrifty.gateway.cache import ResponseCache
from thrifty.gateway.cache.embedded import EmbeddedStore
from thrifty.gateway.costs import Price, request_cost
from thrifty.gateway.tiers import build_gateway, check_tiers
from thrifty.server.app import create_app, create_gateway_app
from thrifty.server.background import ServerThread
from router_fakes import ScriptedCascade
from test_gateway_fallback import request

CLOUD_KEY = "sk-cloud-secret-4711"
WRONG_KEY = "sk-wrong-secret-0815"
ENGINE = dict(dtype="float32", num_kv_blocks=256, block_size=16)
SMALL, LARGE = Price(1.0, 0.5, 2.0), Price(10.0, 5.0, 20.0)


@pytest.fixture(scope="module")
def cloud(tiny_gguf):
    """A second thrifty server, with an API key, standing in for a cloud API."""
    engine = LLMEngine.from_model(str(tiny_gguf), **ENGINE)
    app = create_app(AsyncEngine(engine), "cloud-model", ServerSettings(max_output_tokens=256), api_key=CLOUD_KEY)
    with ServerThread(app) as srv:
        yield srv


def _tier_config(tiny_gguf, tmp_path, tiers: list[TierSettings]) -> ThriftyConfig:
    return ThriftyConfig(model_list=tiers, router=RouterSettings(retries=0, cooldown_s=0.0),
                         server=ServerSettings(max_output_tokens=256, ledger_path=str(tmp_path / "ledger.sqlite3")))


@pytest.fixture(scope="module")
def server(tiny_gguf, cloud, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_CLOUD_KEY", CLOUD_KEY)
        config = _tier_config(tiny_gguf, tmp, [
            TierSettings("small", str(tiny_gguf), dict(ENGINE), price=PriceSettings(1.0, 0.5, 2.0)),
            TierSettings("large", "cloud-model", api_base=cloud.url + "/v1", api_key_env="TEST_CLOUD_KEY",
                         price=PriceSettings(10.0, 5.0, 20.0))])
        check_tiers(config)
        router = ScriptedCascade("#escalate")
        gateway = build_gateway(config, router)
    cache = ResponseCache(EmbeddedStore(tmp / "responses.sqlite3"), timeout_s=2.0)
    app = create_gateway_app(gateway, config.server, cache=cache, cache_settings=CacheSettings())
    with ServerThread(app) as srv:
        srv.gateway, srv.router = gateway, router
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def cost_of(price: Price, usage) -> float:
    return request_cost(price, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens)


def test_models_lists_tiers_and_auto(client, server):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["small", "large", "auto"]
    assert models["small"].model_extra["max_model_len"] > 0 and models["large"].model_extra["max_model_len"] is None


def test_auto_routes_with_route_and_cost_headers(client, server):
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=msgs("What is 2+2?"),
                                                           max_tokens=6, temperature=0)
    r = raw.parse()
    assert raw.headers["x-thrifty-route"] == "small; cascade: check passed" and r.model == "small"
    assert raw.headers["x-thrifty-cost"] == f"{cost_of(SMALL, r.usage):.8f}"
    assert r.choices[0].logprobs is None  # asked for internally (the check saw them), not shown
    assert server.router.answers[-1].token_logprobs and len(server.router.answers[-1].token_logprobs) == \
        r.usage.completion_tokens


def test_escalated_cascade_pays_both(client, server):
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=msgs("sort a list #escalate"),
                                                           max_tokens=6, temperature=0)
    r = raw.parse()
    assert raw.headers["x-thrifty-route"] == "large; cascade: examples failed" and r.model == "large"
    charges = [c for c in server.gateway.ledger.charges() if c.request_id == r.id]
    assert [(c.tier, c.final) for c in charges] == [("small", False), ("large", True)]
    assert charges[1].cost_usd == pytest.approx(cost_of(LARGE, r.usage))
    assert raw.headers["x-thrifty-cost"] == f"{charges[0].cost_usd + charges[1].cost_usd:.8f}"
    # streamed, the cheap answer is buffered and checked first; the text is the large tier's
    stream = client.chat.completions.create(model="auto", messages=msgs("sort a list #escalate"), max_tokens=6,
                                            temperature=0, stream=True, extra_body={"cache": {"no-cache": True}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content


def test_pinned_tiers_and_the_local_alias(client, server, tiny_gguf):
    kw = dict(messages=msgs("Name a color."), max_tokens=8, temperature=0, extra_body={"cache": {"no-cache": True}})
    local = client.chat.completions.with_raw_response.create(model="small", **kw)
    remote = client.chat.completions.with_raw_response.create(model="large", **kw)
    alias = client.chat.completions.create(model=str(tiny_gguf), **kw)
    assert local.headers["x-thrifty-route"] == "small; pinned" and remote.headers["x-thrifty-route"] == "large; pinned"
    # the cloud stand-in runs the same tiny model: greedy answers agree across the wire
    assert remote.parse().choices[0].message.content == local.parse().choices[0].message.content
    assert alias.model == "small" and alias.choices[0].message.content == local.parse().choices[0].message.content
    assert remote.headers["x-thrifty-cost"] == f"{cost_of(LARGE, remote.parse().usage):.8f}"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", **kw)


def test_streaming_through_the_remote_tier(client, server):
    kw = dict(model="large", messages=msgs("Tell me a story"), max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw, extra_body={"cache": {"no-cache": True}})
    raw = client.chat.completions.with_raw_response.create(**kw, stream=True, stream_options={"include_usage": True},
                                                           extra_body={"cache": {"no-cache": True}})
    assert raw.headers["x-thrifty-route"] == "large; pinned" and "x-thrifty-cost" not in raw.headers
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="large", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert text == client.completions.create(model="small", prompt="Once upon a time", max_tokens=8,
                                             temperature=0).choices[0].text


def test_remote_logprobs_when_asked(client):
    kw = dict(messages=msgs("hi"), max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    remote = client.chat.completions.create(model="large", **kw).choices[0].logprobs.content
    local = client.chat.completions.create(model="small", **kw).choices[0].logprobs.content
    assert [t.token for t in remote] == [t.token for t in local] and all(len(t.top_logprobs) == 2 for t in remote)
    assert [t.logprob for t in remote] == pytest.approx([t.logprob for t in local], abs=1e-4)


def test_cache_hit_costs_nothing_and_books_its_saving(server):
    body = {"model": "large", "messages": msgs("What is the capital of France?"), "max_tokens": 6, "temperature": 0}
    first = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    second = None
    for _ in range(50):  # the store is written in the background
        second = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        if second.headers["x-thrifty-cache"] == "hit":
            break
    assert first.headers["x-thrifty-cache"] == "miss" and second.headers["x-thrifty-cache"] == "hit"
    assert second.headers["x-thrifty-route"] == "large; cache hit" and second.headers["x-thrifty-cost"] == "0.00000000"
    usage = second.json()["usage"]
    hit = [c for c in server.gateway.ledger.charges() if c.request_id == second.json()["id"]][0]
    assert hit.cost_usd == 0.0 and hit.cache == "hit"
    assert hit.saved_cache_usd == pytest.approx(request_cost(LARGE, usage["prompt_tokens"], 0,
                                                             usage["completion_tokens"]))


def test_report_endpoint_and_cost_metrics(server, client):
    client.chat.completions.create(model="small", messages=msgs("report me"), max_tokens=3, temperature=0)
    report = httpx.get(server.url + "/v1/thrifty/report").json()
    tiers = {t["name"]: t for t in report["by_tier"]}
    assert list(tiers) == ["small", "large"]
    charges = server.gateway.ledger.charges()
    total = report["total"]
    assert total["requests"] == sum(c.final for c in charges) and total["attempts"] == len(charges)
    assert total["cost_usd"] == pytest.approx(sum(c.cost_usd for c in charges))
    assert total["saved_routing_usd"] == pytest.approx(total["baseline_usd"] - total["cost_usd"]
                                                       - total["saved_cache_usd"])
    assert total["saved_cache_usd"] > 0 and "| total" in report["table"]
    assert httpx.get(server.url + "/v1/thrifty/report", params={"since": "2999-01-01"}).json()["total"]["requests"] == 0
    bad = httpx.get(server.url + "/v1/thrifty/report", params={"since": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    metrics = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        m = re.match(r"^(thrifty_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            metrics[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    assert metrics['thrifty_cost_usd_total{tier="small"}'] == pytest.approx(tiers["small"]["cost_usd"])
    assert metrics['thrifty_cost_usd_total{tier="large"}'] == pytest.approx(tiers["large"]["cost_usd"])
    assert metrics["thrifty_baseline_cost_usd_total"] == pytest.approx(total["baseline_usd"])
    assert metrics['thrifty_saved_usd{reason="cache"}'] == pytest.approx(total["saved_cache_usd"])
    assert metrics['thrifty_saved_usd{reason="routing"}'] == pytest.approx(total["saved_routing_usd"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_down_tier_falls_back_and_keys_stay_secret(tiny_gguf, cloud, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_CLOUD_KEY", CLOUD_KEY)
        mp.setenv("TEST_WRONG_KEY", WRONG_KEY)
        config = _tier_config(tiny_gguf, tmp_path, [
            TierSettings("small", str(tiny_gguf), dict(ENGINE), price=PriceSettings(1.0, 0.5, 2.0)),
            TierSettings("down", "m", api_base=f"http://127.0.0.1:{_closed_port()}/v1", price=PriceSettings(2, 1, 4)),
            TierSettings("wrong", "cloud-model", api_base=cloud.url + "/v1", api_key_env="TEST_WRONG_KEY",
                         price=PriceSettings(3.0, 1.0, 6.0))])
        gateway = build_gateway(config)
    with ServerThread(create_gateway_app(gateway, config.server)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        raw = c.chat.completions.with_raw_response.create(model="down", messages=msgs("hi"), max_tokens=4)
        assert raw.headers["x-thrifty-route"] == "small; pinned; fallback from down" and raw.parse().model == "small"
        stream = c.chat.completions.with_raw_response.create(model="wrong", messages=msgs("hi"), max_tokens=4,
                                                             stream=True)
        assert stream.headers["x-thrifty-route"] == "small; pinned; fallback from wrong"
        assert "".join(ch.choices[0].delta.content or "" for ch in stream.parse() if ch.choices)
    # straight against the cloud stand-in: a refused key is a tier failure whose message never holds the key
    backend = RemoteBackend("wrong", cloud.url + "/v1", "cloud-model", api_key=WRONG_KEY)

    async def call():
        try:
            return [out async for out in backend.generate(backend.prepare(request()))]
        finally:
            await backend.close()

    with pytest.raises(BackendError) as e:
        asyncio.run(call())
    assert "HTTP 401" in str(e.value) and WRONG_KEY not in str(e.value) and "api_key_env" in str(e.value)
    assert "tier wrong failed" in caplog.text or "tier down failed" in caplog.text
    assert WRONG_KEY not in caplog.text and CLOUD_KEY not in caplog.text


def test_remote_only_gateway(cloud, tmp_path):
    """No local tier: nothing to tokenize with; the remote checks the request, the cache keys on its bytes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_CLOUD_KEY", CLOUD_KEY)
        config = ThriftyConfig(model_list=[TierSettings("cloud", "cloud-model", api_base=cloud.url + "/v1",
                                                        api_key_env="TEST_CLOUD_KEY",
                                                        price=PriceSettings(10.0, 5.0, 20.0))],
                               server=ServerSettings(ledger_path=str(tmp_path / "ledger.sqlite3")))
        gateway = build_gateway(config)
    cache = ResponseCache(EmbeddedStore(tmp_path / "responses.sqlite3"), timeout_s=2.0)
    with ServerThread(create_gateway_app(gateway, config.server, cache=cache)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["cloud"]
        kinds = []
        for question in ("one", "two", "one"):
            raw = c.chat.completions.with_raw_response.create(model="auto", messages=msgs(question), max_tokens=4,
                                                              temperature=0)
            kinds.append(raw.headers["x-thrifty-cache"])
            assert raw.parse().model == "cloud" and raw.parse().usage.prompt_tokens > 0
            if kinds[-1] == "miss":
                time.sleep(0.3)  # let the background store land
        assert kinds == ["miss", "miss", "hit"]
        r = c.completions.create(model="cloud", prompt="Once upon", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.BadRequestError) as e:  # the remote's own 400, passed on
            c.completions.create(model="cloud", prompt="x", max_tokens=10_000)
        assert "max_tokens" in e.value.body["message"]
        assert [c.cache for c in gateway.ledger.charges()] == ["", "", "hit", ""]  # the refused one cost nothing


def test_served_engines_protect_streams_while_prompts_prefill(server):
    """A server's local tiers get the prefill budget (max_decode_slowdown 2.0); LLM / benchmarks keep full chunks."""
    from thrifty.engine.engine import EngineConfig

    local = server.gateway.tiers["small"].backend.engine.engine
    assert local.scheduler.prefill_budget is not None and local.scheduler.prefill_budget.max_slowdown == 2.0
    assert EngineConfig().max_decode_slowdown is None
