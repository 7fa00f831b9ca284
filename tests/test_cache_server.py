"""The response cache in the server, on a tiny random model and the embedded store: headers, exact and
semantic hits, SSE replay, usage and metrics, per-request controls, tenant isolation, and 64 concurrent
identical requests making one engine call. Semantic hits need the real MiniLM embedder (marked `real`);
everything else runs on a server with the exact cache only."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from thrifty.config import CacheSettings, ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.gateway.cache import ResponseCache
from thrifty.gateway.cache.embedded import EmbeddedStore
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread

MODEL = "tiny"


@pytest.fixture(scope="module")
def embedder():
    from thrifty.models.embedder import Embedder

    return Embedder.from_zoo()


def _serve(tiny_gguf, embedder, tmp_path_factory):
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=512, block_size=16)
    aengine = AsyncEngine(engine)
    calls = []
    original = aengine.generate

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    aengine.generate = counting
    store = EmbeddedStore(tmp_path_factory.mktemp("cache") / "responses.sqlite3")
    semantic = embedder is not None
    cache = ResponseCache(store, embedder=embedder, semantic=semantic, timeout_s=2.0)
    app = create_app(aengine, MODEL, ServerSettings(max_output_tokens=256), cache=cache,
                     cache_settings=CacheSettings(semantic=semantic))
    with ServerThread(app) as srv:
        srv.calls, srv.cache = calls, cache
        yield srv


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    """The exact cache and coalescing, no embedder."""
    yield from _serve(tiny_gguf, None, tmp_path_factory)


@pytest.fixture(scope="module")
def semantic_server(tiny_gguf, embedder, tmp_path_factory):
    yield from _serve(tiny_gguf, embedder, tmp_path_factory)


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    r = httpx.post(server.url + path, json={"model": MODEL, **body}, headers=headers or {}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def chat(server, text: str, headers: dict | None = None, **kw) -> httpx.Response:
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
            "max_tokens": 8, "temperature": 0, **kw}
    return post(server, "/v1/chat/completions", body, headers)


def metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        m = re.match(r"^(thrifty_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def settle(server) -> None:
    """Writes happen in the background after the answer went out; give them a moment to land."""
    time.sleep(0.3)


def test_miss_then_exact_hit(server):
    before, m0 = len(server.calls), metrics(server)
    r1 = chat(server, "What is the boiling point of water at sea level?")
    assert r1.headers["x-thrifty-cache"] == "miss"
    settle(server)
    r2 = chat(server, "What is the boiling point of water at sea level?")
    assert r2.headers["x-thrifty-cache"] == "hit" and r2.headers["x-thrifty-cache-similarity"] == "1.0000"
    assert len(server.calls) == before + 1
    a, b = r1.json(), r2.json()
    assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
    assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
    assert b["id"] != a["id"]
    # usage: the same prompt and answer sizes; on the hit every prompt token was cached, none computed
    assert b["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"]
    assert b["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == b["usage"]["prompt_tokens"]
    m1 = metrics(server)
    assert m1['thrifty_cache_requests_total{result="hit"}'] == m0.get('thrifty_cache_requests_total{result="hit"}', 0) + 1
    assert m1['thrifty_cache_requests_total{result="miss"}'] >= 1
    # the engine's token counters count computed tokens only: the hit added none
    assert m1["thrifty_completion_tokens_total"] - m0.get("thrifty_completion_tokens_total", 0) == \
        a["usage"]["completion_tokens"]
    assert m1['thrifty_cache_served_tokens_total{kind="hit"}'] >= b["usage"]["completion_tokens"]


def test_completions_endpoint_hits_too(server):
    body = {"prompt": "Once upon a time in a quiet village", "max_tokens": 6, "temperature": 0}
    r1 = post(server, "/v1/completions", body)
    settle(server)
    r2 = post(server, "/v1/completions", body)
    assert (r1.headers["x-thrifty-cache"], r2.headers["x-thrifty-cache"]) == ("miss", "hit")
    assert r2.json()["choices"][0]["text"] == r1.json()["choices"][0]["text"]


@pytest.mark.real
def test_semantic_hit_reports_similarity_and_traps_miss(semantic_server):
    server = semantic_server
    r1 = chat(server, "How do I bleed a radiator?")
    settle(server)
    before = len(server.calls)
    r2 = chat(server, "um hi, how do i bleed a radiator")
    assert r2.headers["x-thrifty-cache"] == "semantic-hit"
    sim = float(r2.headers["x-thrifty-cache-similarity"])
    assert 0.3 < sim < 1.0
    assert r2.json()["choices"][0]["message"]["content"] == r1.json()["choices"][0]["message"]["content"]
    assert len(server.calls) == before
    for trap in ("How do I bleed a radiator in Leeds?", "How do I not bleed a radiator?",
                 "How do I bleed 2 radiators?"):
        assert chat(server, trap).headers["x-thrifty-cache"] == "miss", trap
    assert metrics(server)["thrifty_cache_semantic_similarity_count"] >= 1


@pytest.mark.real
def test_semantic_scope_is_the_whole_context(semantic_server):
    server = semantic_server
    chat(server, "How do I descale a kettle?")
    settle(server)
    other_system = {"messages": [{"role": "system", "content": "Answer in French."},
                                 {"role": "user", "content": "how do i descale a kettle"}],
                    "max_tokens": 8, "temperature": 0}
    assert post(server, "/v1/chat/completions", other_system).headers["x-thrifty-cache"] == "miss"
    assert chat(server, "how do i descale a kettle", max_tokens=9).headers["x-thrifty-cache"] == "miss"


def test_stream_replays_a_cached_answer_as_sse(server):
    first = chat(server, "Name three primary colours.")
    settle(server)
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Name three primary colours."}],
            "max_tokens": 8, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={"model": MODEL, **body}, timeout=60) as r:
        assert r.headers["x-thrifty-cache"] == "hit"
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == first.json()["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == \
        first.json()["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == \
        first.json()["usage"]["completion_tokens"]
    # and through the official SDK
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    sdk_text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=body["messages"], max_tokens=8, temperature=0, stream=True) if c.choices)
    assert sdk_text == text


@pytest.mark.real
def test_tenants_never_share(semantic_server):
    server = semantic_server
    q = "What documents do I need to open a bank account?"
    a = {"x-thrifty-tenant": "acme"}
    b = {"x-thrifty-tenant": "globex"}
    chat(server, q, a)
    settle(server)
    assert chat(server, q, a).headers["x-thrifty-cache"] == "hit"
    assert chat(server, q, b).headers["x-thrifty-cache"] == "miss"               # exact
    assert chat(server, "um, what documents do i need to open a bank account", a).headers["x-thrifty-cache"] \
        == "semantic-hit"
    assert chat(server, "um, what documents do i need to open a bank account", {"x-thrifty-tenant": "initech"}
                ).headers["x-thrifty-cache"] == "miss"                           # semantic
    # another API key is another tenant as well
    assert chat(server, q, {**a, "authorization": "Bearer other-key"}).headers["x-thrifty-cache"] == "miss"


def test_per_request_controls(server):
    q = "List the planets of the solar system."
    r = chat(server, q, cache={"no-store": True})
    assert r.headers["x-thrifty-cache"] == "miss"
    settle(server)
    assert chat(server, q).headers["x-thrifty-cache"] == "miss"                  # nothing was stored
    settle(server)
    before = len(server.calls)
    assert chat(server, q, cache={"no-cache": True}).headers["x-thrifty-cache"] == "miss"
    assert chat(server, q, {"cache-control": "no-cache"}).headers["x-thrifty-cache"] == "miss"
    assert len(server.calls) == before + 2
    assert chat(server, q).headers["x-thrifty-cache"] == "hit"
    assert chat(server, q, cache={"namespace": "other"}).headers["x-thrifty-cache"] == "miss"
    assert chat(server, q, cache={"s-maxage": 0}).headers["x-thrifty-cache"] == "miss"
    bad = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": q}], "cache": {"ttl": "soon"}})
    assert bad.status_code == 400


def test_sampled_requests_are_not_cached_unless_seeded(server):
    q = "Write a word."
    chat(server, q, temperature=0.9)
    settle(server)
    assert chat(server, q, temperature=0.9).headers["x-thrifty-cache"] == "miss"
    chat(server, q, temperature=0.9, seed=7)
    settle(server)
    assert chat(server, q, temperature=0.9, seed=7).headers["x-thrifty-cache"] == "hit"
    assert chat(server, q, temperature=0.9, seed=8).headers["x-thrifty-cache"] == "miss"


def test_64_concurrent_identical_requests_make_one_engine_call(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count slowly from one to fifty."}],
            "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    stream_body = {**body, "stream": True}
    before = len(server.calls)

    async def one(client: httpx.AsyncClient, i: int):
        if i % 4 == 3:  # a quarter of them stream
            async with client.stream("POST", "/v1/chat/completions", json=stream_body) as r:
                events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
            text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                           for e in events[:-1] if json.loads(e)["choices"])
            return r.headers["x-thrifty-cache"], text
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.headers["x-thrifty-cache"], r.json()["choices"][0]["message"]["content"]

    async def main():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    kinds = [k for k, _ in results]
    assert len(server.calls) - before == 1, kinds
    assert kinds.count("miss") == 1 and set(kinds) <= {"miss", "coalesced", "hit"}
    assert kinds.count("coalesced") >= 1
    assert len({t for _, t in results}) == 1 and results[0][1]
