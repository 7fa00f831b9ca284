"""Speculative decoding over HTTP, with the official openai SDK: usage says how many draft tokens were
proposed and kept (non-stream and the final stream chunk), `"speculative": false` in the body turns it off
for one request, and the text is the same either way (greedy)."""
from __future__ import annotations

import openai
import pytest

from thrifty.config import ServerSettings
from thrifty.engine.engine import LLMEngine
from serving import engine_server, sdk_client

MODEL = "tiny"
# the draft is the target itself: every draft is kept, so each request's counts are non-zero
SPEC = dict(dtype="float32", num_kv_blocks=256, block_size=16)


@pytest.fixture(scope="module")
def server(tiny_gguf):
    engine = LLMEngine.from_model(str(tiny_gguf), **SPEC, speculative={
        "method": "draft", "draft_model": str(tiny_gguf), "num_tokens": 3})
    with engine_server(engine, MODEL, ServerSettings(max_output_tokens=400)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return sdk_client(server)


ASK = dict(model=MODEL, messages=[{"role": "user", "content": "the the the cat sat on the mat"}], max_tokens=24,
           temperature=0.0, extra_body={"ignore_eos": True})


def test_usage_reports_draft_and_accepted_tokens(client):
    r = client.chat.completions.create(**ASK)
    usage = r.usage.model_dump()
    assert usage["completion_tokens"] == 24
    assert 0 < usage["accepted_tokens"] <= usage["draft_tokens"]


def test_the_final_stream_chunk_reports_them_too(client):
    chunks = list(client.chat.completions.create(**ASK, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage.model_dump()
    assert 0 < usage["accepted_tokens"] <= usage["draft_tokens"]
    assert all(c.usage is None for c in chunks[:-1])


def test_opt_out_per_request(client, server):
    before = server.engine.speculator.stats.num_drafts
    off = client.chat.completions.create(**{**ASK, "extra_body": {"ignore_eos": True, "speculative": False}})
    assert server.engine.speculator.stats.num_drafts == before
    usage = off.usage.model_dump()
    assert "accepted_tokens" not in usage and "draft_tokens" not in usage
    on = client.chat.completions.create(**ASK)
    assert on.choices[0].message.content == off.choices[0].message.content


def test_completions_take_the_opt_out_too(client):
    kwargs = dict(model=MODEL, prompt="one two one two one two", max_tokens=16, temperature=0.0)
    on = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    off = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "speculative": False})
    assert on.choices[0].text == off.choices[0].text
    assert on.usage.model_dump()["accepted_tokens"] > 0 and "accepted_tokens" not in off.usage.model_dump()


def test_a_non_boolean_opt_out_is_refused(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**ASK, "extra_body": {"speculative": "no"}})
