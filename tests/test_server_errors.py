"""Bad input, auth and limits: each case gets the right status and OpenAI error JSON, changes no state, and
the server keeps serving a stream that runs alongside."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from thrifty.config import ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread

MODEL = "tiny"
KEY = "sk-test-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ServerSettings(max_output_tokens=300, max_body_bytes=4096, max_waiting_requests=1)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def server(tiny_gguf):
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=256, max_num_seqs=2)
    app = create_app(AsyncEngine(engine), MODEL, LIMITS, api_key=KEY)
    with ServerThread(app) as srv:
        srv.engine = engine
        yield srv


def msgs(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def good(**extra) -> dict:
    return {"model": MODEL, "messages": msgs(), "max_tokens": 4, "temperature": 0, **extra}


# name, path, raw body (bytes) or JSON, headers, status, param, code
CASES = [
    ("malformed JSON", CHAT, b'{"model": "tiny", "messages": [', AUTH, 400, None, None),
    ("body is not an object", CHAT, b'[1, 2, 3]', AUTH, 400, None, None),
    ("no body", CHAT, b"", AUTH, 400, None, None),
    ("max_tokens as string", CHAT, good(max_tokens="ten"), AUTH, 400, "max_tokens", None),
    ("temperature as string", CHAT, good(temperature="0.5"), AUTH, 400, "temperature", None),
    ("messages not a list", CHAT, good(messages="hello"), AUTH, 400, "messages", None),
    ("message without role", CHAT, good(messages=[{"content": "x"}]), AUTH, 400, "messages.0.role", None),
    ("prompt as number", COMPLETIONS, {"model": MODEL, "prompt": 5}, AUTH, 400, "prompt", None),
    ("missing model", CHAT, {"messages": msgs()}, AUTH, 400, "model", None),
    ("unknown model", CHAT, good(model="gpt-4o"), AUTH, 404, "model", "model_not_found"),
    ("empty messages", CHAT, good(messages=[]), AUTH, 400, "messages", None),
    ("empty prompt", COMPLETIONS, {"model": MODEL, "prompt": ""}, AUTH, 400, "prompt", None),
    ("prompt over the context", COMPLETIONS, {"model": MODEL, "prompt": [65] * 600}, AUTH, 400, "prompt", None),
    ("token id outside the vocabulary", COMPLETIONS, {"model": MODEL, "prompt": [10**9]}, AUTH, 400, "prompt",
     None),
    ("max_tokens over the limit", CHAT, good(max_tokens=301), AUTH, 400, "max_tokens", None),
    ("prompt + max_tokens over the context", COMPLETIONS,
     {"model": MODEL, "prompt": [65] * 300, "max_tokens": 250}, AUTH, 400, "max_tokens", None),
    ("max_completion_tokens over the limit", CHAT, good(max_completion_tokens=1000), AUTH, 400,
     "max_completion_tokens", None),
    ("negative temperature", CHAT, good(temperature=-0.5), AUTH, 400, "temperature", None),
    ("top_p zero", CHAT, good(top_p=0), AUTH, 400, "top_p", None),
    ("top_logprobs over 20", CHAT, good(logprobs=True, top_logprobs=50), AUTH, 400, "top_logprobs", None),
    ("top_logprobs without logprobs", CHAT, good(top_logprobs=2), AUTH, 400, "top_logprobs", None),
    ("n > 1", CHAT, good(n=3), AUTH, 400, "n", None),
    ("tools", CHAT, good(tools=[{"type": "function", "function": {"name": "f"}}]), AUTH, 400, "tools", None),
    ("stream_options without stream", CHAT, good(stream_options={"include_usage": True}), AUTH, 400,
     "stream_options", None),
    ("echo", COMPLETIONS, {"model": MODEL, "prompt": "a", "echo": True}, AUTH, 400, "echo", None),
    ("batched prompts", COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, AUTH, 400, "prompt", None),
    ("oversized body", CHAT, good(messages=msgs("x" * 5000)), AUTH, 413, None, "payload_too_large"),
    ("missing API key", CHAT, good(), {}, 401, None, "invalid_api_key"),
    ("wrong API key", CHAT, good(), {"Authorization": "Bearer sk-wrong"}, 401, None, "invalid_api_key"),
    ("wrong auth scheme", CHAT, good(), {"Authorization": f"Basic {KEY}"}, 401, None, "invalid_api_key"),
    ("unknown route", "/v1/embeddings", good(), AUTH, 404, None, 404),
    # valid JSON, but not text: a lone surrogate (a string cut inside an emoji) reaches no tokenizer
    ("lone surrogate in a message", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud83d"}]}',
     AUTH, 400, "messages.0.content", None),
    ("lone surrogate in a text part", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": '
     b'[{"type": "text", "text": "\\udc00x"}]}]}', AUTH, 400, "messages.0.content.0.text", None),
    ("lone surrogate in a prompt", COMPLETIONS, b'{"model": "tiny", "prompt": "a\\ud800b"}', AUTH, 400, "prompt", None),
    ("lone surrogate in stop", COMPLETIONS, b'{"model": "tiny", "prompt": "a", "stop": ["\\udfff"]}', AUTH, 400,
     "stop.0", None),
    ("user message with null content", CHAT, good(messages=[{"role": "user", "content": None}]), AUTH, 400,
     "messages.0", None),
]


def post(server, path: str, body, headers: dict) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body, headers={**headers, "content-type": "application/json"})
    return httpx.post(server.url + path, json=body, headers=headers)


@pytest.fixture(scope="module")
def background_stream(server):
    """A long stream that runs while the bad requests come in; it must finish untouched."""
    result: dict = {}
    started = threading.Event()

    def run():
        body = {"model": MODEL, "prompt": "keep going", "max_tokens": 120, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + COMPLETIONS, json=body, headers=AUTH, timeout=120) as r:
            lines = []
            for line in r.iter_lines():
                started.set()
                lines += [line] if line else []
            result["lines"] = lines

    t = threading.Thread(target=run)
    t.start()
    # running, not waiting: with max_waiting_requests=1 a waiting stream would make the next request a 429
    assert started.wait(60)
    yield result
    t.join(120)


@pytest.mark.parametrize("name,path,body,headers,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, background_stream, name, path, body, headers, status, param, code):
    free_before = server.engine.block_manager.num_free_blocks
    r = post(server, path, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["param"] == param and error["code"] == code
    assert error["type"] == {401: "authentication_error", 404: "invalid_request_error" if code != 404
                             else "not_found_error"}.get(status, "invalid_request_error")
    assert KEY not in r.text
    # the server keeps serving, and the bad request left nothing behind
    ok = post(server, CHAT, good(), AUTH)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    assert server.engine.block_manager.num_free_blocks >= free_before - 16  # only the background stream grows


def test_background_stream_unaffected(server, background_stream):
    deadline = time.monotonic() + 120
    while "lines" not in background_stream and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = background_stream["lines"]
    assert lines[-1] == "data: [DONE]"
    assert '"completion_tokens":120' in lines[-2]


def test_openai_sdk_errors(server):
    no_key = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.models.list()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=msgs())
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs(), temperature=-1)
    assert e.value.body["param"] == "temperature"
    assert client.models.list().data[0].id == MODEL
    # with a key set, only health stays open (load balancers probe it); metrics and the API docs need the key
    assert httpx.get(server.url + "/health").status_code == 200
    for path in ("/metrics", "/docs", "/openapi.json", "/redoc"):
        assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(server.url + path, headers=AUTH).status_code == 200, path


def test_queue_full_is_429_with_retry_after(server):
    """max_waiting_requests=1: with the engine held between steps, one request waits and the next gets 429."""
    engine, gate = server.engine, threading.Event()
    real_step = engine.step

    def held_step():
        gate.wait(30)
        return real_step()

    body = {"model": MODEL, "prompt": "long", "max_tokens": 8, "temperature": 0, "stream": True}
    engine.step = held_step
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
            with http.stream("POST", COMPLETIONS, json=body) as waiting:
                assert waiting.status_code == 200  # accepted; the engine has not run it yet
                r = http.post(COMPLETIONS, json={**body, "stream": False})
                assert r.status_code == 429, r.text
                assert r.headers["Retry-After"] == "1"
                error = r.json()["error"]
                assert error["type"] == "rate_limit_error" and "waiting" in error["message"]
                gate.set()
                lines = [line for line in waiting.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
    finally:
        gate.set()
        del engine.step
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'thrifty_requests_total{endpoint="/v1/completions",status="429"} 1.0' in metrics
    assert 'thrifty_requests_rejected_total{reason="queue_full"} 1.0' in metrics
    assert post(server, CHAT, good(), AUTH).status_code == 200
