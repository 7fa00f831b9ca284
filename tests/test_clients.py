"""LiteLLM's SDK and curl as clients of the gateway server (a local tiny-model tier and a second thrifty server as the
remote tier), over real HTTP: the same answers, usage, streams, headers, cache hits and errors that the official
openai SDK sees in test_gateway_server.py."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import openai
import pytest

# LiteLLM fetches a model price map from the internet at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm")

from test_gateway_server import cloud, server  # noqa: E402,F401  (module fixtures: the gateway app and its tiers)

litellm.telemetry = False


def kw(server, model: str, text: str, max_tokens: int = 8) -> dict:
    return dict(model=f"openai/{model}", api_base=server.url + "/v1", api_key="unused", num_retries=0,
                messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0)


def headers(response) -> dict[str, str]:
    """The HTTP headers of the reply, as LiteLLM keeps them (prefixed with `llm_provider-`)."""
    return {k.removeprefix("llm_provider-"): v for k, v in response._hidden_params["additional_headers"].items()}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("tier", ["small", "large"])
def test_chat_matches_the_openai_sdk(server, client, tier):
    text = f"Name a colour ({tier})."
    ref = client.chat.completions.create(model=tier, messages=[{"role": "user", "content": text}], max_tokens=8,
                                         temperature=0)
    r = litellm.completion(**kw(server, tier, text))
    assert r.choices[0].message.content == ref.choices[0].message.content
    assert r.choices[0].finish_reason == ref.choices[0].finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    assert headers(r)["x-thrifty-route"].startswith(tier)


def test_auto_route_and_cost_headers_reach_litellm(server):
    r = litellm.completion(**kw(server, "auto", "What is 3+3?"))
    h = headers(r)
    assert h["x-thrifty-route"] == "small; cascade: check passed" and r.model.endswith("small")
    assert float(h["x-thrifty-cost"]) > 0


def test_stream_assembles_to_the_whole_answer(server):
    whole = litellm.completion(**kw(server, "small", "Tell me a story", max_tokens=16))
    chunks = list(litellm.completion(**kw(server, "small", "Tell me a story", max_tokens=16), stream=True,
                                     stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens == whole.usage.completion_tokens


def test_cache_hit_through_litellm(server):
    args = kw(server, "large", "What is the capital of Spain?", max_tokens=6)
    first = litellm.completion(**args)
    assert headers(first)["x-thrifty-cache"] == "miss"
    for _ in range(50):  # the store is written in the background
        again = litellm.completion(**args)
        if headers(again)["x-thrifty-cache"] == "hit":
            break
    assert headers(again)["x-thrifty-cache"] == "hit" and headers(again)["x-thrifty-cost"] == "0.00000000"
    assert again.choices[0].message.content == first.choices[0].message.content


def test_concurrent_async_requests(server, client):
    texts = [f"Question {i}: say something about {i * 5 % 7}" for i in range(8)]
    solo = [client.chat.completions.create(model="small", messages=[{"role": "user", "content": t}], max_tokens=8,
                                           temperature=0).choices[0].message.content for t in texts]

    async def main():
        return await asyncio.gather(*(litellm.acompletion(**kw(server, "small", t)) for t in texts))

    assert [r.choices[0].message.content for r in asyncio.run(main())] == solo


def test_unsupported_field_is_a_clear_400(server):
    with pytest.raises(litellm.BadRequestError) as e:
        litellm.completion(**kw(server, "small", "Hi"), n=2)
    assert "n" in str(e.value) and "not supported" in str(e.value)


def curl(*args: str) -> str:
    done = subprocess.run(["curl", "-sS", "--fail-with-body", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_chat_and_stream_match_the_sdk(server, client):
    """curl, as the README calls it: the same answer as the SDK, and a stream of `data:` lines ending in [DONE]."""
    body = {"model": "small", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8,
            "temperature": 0}
    ref = client.chat.completions.create(**body)
    out = json.loads(curl(server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)))
    assert out["choices"][0]["message"]["content"] == ref.choices[0].message.content
    streamed = curl("-N", server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                    "-d", json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}))
    events = [line.removeprefix("data: ") for line in streamed.splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == \
        ref.choices[0].message.content
    assert chunks[-1]["usage"]["completion_tokens"] == ref.usage.completion_tokens
