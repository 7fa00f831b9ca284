"""Hostile input through the whole path (HTTP, validation, chat template, tokenizer, engine, detokenizer), as
property tests: every JSON string a client can send is served (200) or refused with a 400 that names the field;
never a 5xx, and the server keeps serving."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from thrifty.config import ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.server.app import create_app
from thrifty.server.background import ServerThread

MODEL = "tiny"
# every code point, lone surrogates and control characters included (hypothesis leaves surrogates out by default)
ANY_CHAR = st.characters(exclude_categories=())
TEXT = st.text(ANY_CHAR, max_size=60) | st.text(st.sampled_from("\x00\x1b\u202e\ufeff\ud800\udfff\U0001F600 a"),
                                               max_size=40)
HUGE_WORD = st.integers(1, 4000).map(lambda n: "x" * n)
RUNS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server(tiny_gguf):
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=256)
    app = create_app(AsyncEngine(engine), MODEL, ServerSettings(max_output_tokens=16))
    with ServerThread(app) as srv:
        srv.engine = engine
        yield srv


def as_received(text: str) -> str:
    """The text the server reads: JSON escapes a high and a low surrogate side by side as one character."""
    return json.loads(json.dumps(text))


def post(server, path: str, body) -> httpx.Response:
    # json.dumps escapes lone surrogates as \\udXXX: valid JSON, as clients send them
    return httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)


def served_or_named(r: httpx.Response) -> None:
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]


@RUNS
@given(system=TEXT, user=TEXT | HUGE_WORD, stop=st.none() | st.lists(TEXT, max_size=3), user_name=st.none() | TEXT)
@example(system="", user="\ud800\udc00", stop=None, user_name=None)   # a pair: U+10000, served (CI found it)
@example(system="", user="\udc00\ud800", stop=None, user_name=None)   # the wrong order: two lone surrogates
def test_any_chat_text_is_served_or_named(server, system, user, stop, user_name):
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    if stop is not None:
        body["stop"] = stop
    if user_name is not None:
        body["user"] = user_name
    r = post(server, "/v1/chat/completions", body)
    served_or_named(r)
    fields = {"messages.0.content": system, "messages.1.content": user, "user": user_name or "",
              **{f"stop.{i}": text for i, text in enumerate(stop or [])}}
    broken = {name for name, text in fields.items() if any("\ud800" <= c <= "\udfff" for c in as_received(text))}
    if broken:  # a lone surrogate is never served, and the error names a field that holds one
        assert r.status_code == 400 and r.json()["error"]["param"] in broken


@RUNS
@given(prompt=TEXT.filter(bool) | HUGE_WORD, stream=st.booleans())
def test_any_completion_prompt_is_served_or_named(server, prompt, stream):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": stream})
    served_or_named(r)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 400), where=st.sampled_from(["content", "stop", "prompt", "stream_options"]))
def test_deep_nesting_is_a_400(server, depth, where):
    nested: object = "x"
    for _ in range(depth):
        nested = [nested] if depth % 2 else {"a": nested}
    if where == "prompt":
        body = {"model": MODEL, "prompt": nested}
        path = "/v1/completions"
    else:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, where: nested}
        if where == "content":
            body["messages"] = [{"role": "user", "content": nested}]
        path = "/v1/chat/completions"
    r = post(server, path, body)
    assert r.status_code in (200, 400), r.text   # a prompt of one nesting level is a valid batch of one


def test_the_server_still_serves_after_the_properties(server):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 2})
    assert r.status_code == 200
    assert server.engine.block_manager.num_free_blocks == server.engine.block_manager.num_blocks
