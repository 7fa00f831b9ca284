"""The OpenAI-compatible server on a tiny random model, driven by the official openai SDK over real HTTP:
chat, completions, streaming with usage, seeds, stop strings, logprobs, greedy parity with LLM.generate,
32 concurrent streams, prefix-cache usage, and a client that disconnects mid-stream."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from thrifty.config import ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.llm import LLM
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread
from serving import engine_server, sdk_client

MODEL = "tiny"
ENGINE = dict(dtype="float32", num_kv_blocks=512, block_size=16)


@pytest.fixture(scope="module")
def server(tiny_gguf):
    engine = LLMEngine.from_model(str(tiny_gguf), **ENGINE)
    with engine_server(engine, MODEL, ServerSettings(max_output_tokens=400)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return sdk_client(server)


@pytest.fixture(scope="module")
def llm(tiny_gguf) -> LLM:
    return LLM(str(tiny_gguf), **ENGINE)


def test_health_is_ok_only_after_the_warm_up(tiny_gguf):
    """The port opens after one token ran through the engine (kernels built, the first forward done)."""
    engine = LLMEngine.from_model(str(tiny_gguf), **ENGINE)
    assert engine.stats.steps == 0
    with ServerThread(create_app(AsyncEngine(engine), MODEL)) as srv:
        assert engine.stats.steps >= 1 and engine.stats.prompt_tokens_computed == 1
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        assert engine.block_manager.num_free_blocks == ENGINE["num_kv_blocks"]  # the warm-up left nothing


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(thrifty_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n)


def test_chat_greedy_equals_llm(client, llm):
    r = client.chat.completions.create(model=MODEL, messages=chat("What is 2+2?"), max_tokens=12, temperature=0)
    ref = llm.chat(chat("What is 2+2?"), greedy(12), use_tqdm=False)[0]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_greedy_equals_llm(client, llm):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0)
    ref = llm.generate("The capital of France is", greedy(10), use_tqdm=False)[0]
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == len(ref.token_ids)
    ids = llm.tokenizer.encode("def fib(n):")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == llm.generate(ids, greedy(8), use_tqdm=False)[0].text


def test_max_completion_tokens_and_default_length(client):
    r = client.chat.completions.create(model=MODEL, messages=chat("count"), max_completion_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model=MODEL, prompt="x", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16  # OpenAI's default for completions


def test_chat_stream_with_usage(client):
    kw = dict(model=MODEL, messages=chat("Tell me a story"), max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert all(c.usage is None for c in text_chunks) and all(len(c.choices) == 1 for c in text_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1
    # without include_usage there is no usage chunk
    plain = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.usage is None and len(c.choices) == 1 for c in plain)


def test_completion_stream_with_usage(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=15, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_framing(server):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_seed_reproducible(client):
    kw = dict(model=MODEL, messages=chat("Pick a word"), max_tokens=16, temperature=1.0)
    a = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(**kw, seed=1234, stream=True))
    others = {client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert a == b == streamed
    assert len(others | {a}) > 1  # different seeds draw different samples


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    cut = next(i for i in range(3, len(full) - 3) if full.find(full[i:i + 3]) == i and full[i:i + 3].strip())
    stop = full[cut:cut + 3]
    r = client.completions.create(**kw, stop=[stop, "never-seen-stop"])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == full[:cut]


def test_chat_logprobs(client):
    kw = dict(model=MODEL, messages=chat("Hi"), max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        tops = [t.logprob for t in item.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert item.top_logprobs[0].token == item.token and item.logprob == pytest.approx(tops[0])  # greedy
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token
    streamed = [lp for c in client.chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [(x.token, round(x.logprob, 4)) for x in streamed] == [(x.token, round(x.logprob, 4)) for x in content]
    # logprobs without top_logprobs: the chosen token only
    r = client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=3, temperature=0, logprobs=True)
    assert all(item.top_logprobs == [] for item in r.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL, messages=chat("Hi"), max_tokens=3).choices[0].logprobs is None


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok in top and top[tok] == pytest.approx(value) and 1 <= len(top) <= 3
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_models_health_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = metrics(server)
    for name in ("thrifty_num_requests_running", "thrifty_num_requests_waiting", "thrifty_kv_blocks_used",
                 "thrifty_kv_blocks_free", "thrifty_prefix_cache_hit_rate", "thrifty_prompt_tokens_total",
                 "thrifty_cached_prompt_tokens_total", "thrifty_completion_tokens_total",
                 "thrifty_time_to_first_token_seconds_count", "thrifty_time_per_output_token_seconds_count"):
        assert name in m, name
    assert m['thrifty_requests_total{endpoint="/v1/chat/completions",status="200"}'] > 0
    assert m["thrifty_kv_blocks_total"] == ENGINE["num_kv_blocks"]


def test_prefix_cache_reported_as_cached_tokens(client, server):
    before = metrics(server)
    prompt = "You are a helpful assistant. " * 12 + "Answer briefly."
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 64
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert second.choices[0].text == first.choices[0].text
    after = metrics(server)
    assert after["thrifty_cached_prompt_tokens_total"] - before["thrifty_cached_prompt_tokens_total"] >= cached
    assert after["thrifty_prefix_cache_hit_rate"] > 0


def test_n_and_tools_are_clear_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=chat("Hi"), n=2)
    assert e.value.body["param"] == "n" and "not supported" in e.value.body["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=chat("Hi"), tools=[tool])
    assert e.value.body["param"] == "tools"


def test_32_concurrent_streams_unmixed(server, llm):
    prompts = [f"Request {i}: write about topic number {i * 7 % 13}" for i in range(32)]
    solo = [llm.chat(chat(p), greedy(16), use_tqdm=False)[0].text for p in prompts]

    async def one(aclient: openai.AsyncOpenAI, p: str) -> tuple[str, str, int]:
        stream = await aclient.chat.completions.create(model=MODEL, messages=chat(p), max_tokens=16,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True})
        parts, ids, usage = [], set(), None
        async for c in stream:
            ids.add(c.id)
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
            usage = c.usage or usage
        assert len(ids) == 1
        return "".join(parts), ids.pop(), usage.completion_tokens

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    results = asyncio.run(main())
    assert [text for text, _, _ in results] == solo
    assert len({rid for _, rid, _ in results}) == 32
    deadline = time.monotonic() + 10
    while metrics(server)["thrifty_kv_blocks_used"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    m = metrics(server)
    assert m["thrifty_kv_blocks_used"] == 0 and m["thrifty_num_requests_running"] == 0


def test_disconnect_mid_stream_frees_blocks(server):
    engine, real_step = server.engine, server.engine.step
    engine.step = lambda: (time.sleep(0.005), real_step())[1]  # 400 steps take > 2 s: the client leaves first
    try:
        _disconnect_mid_stream(server)
    finally:
        del engine.step


def _disconnect_mid_stream(server):
    before = metrics(server)
    body = {"model": MODEL, "prompt": "Tell me everything " * 10, "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen == 3:
                break
        during = metrics(server)
        assert during["thrifty_kv_blocks_used"] > 0 and during["thrifty_num_requests_running"] == 1
    # the connection is closed here, long before 400 tokens
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        after = metrics(server)
        if after["thrifty_kv_blocks_used"] == 0 and after["thrifty_requests_aborted_total"] > before.get(
                "thrifty_requests_aborted_total", 0):
            break
        time.sleep(0.05)
    assert after["thrifty_kv_blocks_used"] == 0 and after["thrifty_num_requests_running"] == 0
    assert after["thrifty_requests_aborted_total"] == before["thrifty_requests_aborted_total"] + 1
    assert after["thrifty_completion_tokens_total"] == before["thrifty_completion_tokens_total"]  # never finished
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.real
def test_real_model_answers(qwen05_gguf):
    engine = LLMEngine.from_model(str(qwen05_gguf), kv_cache_memory=0.05, max_num_seqs=2)
    app = create_app(AsyncEngine(engine), "qwen2.5-coder-0.5b-instruct", ServerSettings())
    with ServerThread(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", temperature=0, max_tokens=12,
                                      messages=[{"role": "user", "content": "What is 2+2? Answer with a number."}])
    assert "4" in r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
