"""The real cascade (config -> build_router -> CascadeRouter) in a served gateway of two tiny local tiers: a coding
request whose cheap answer has no working code goes up a tier and pays both; a plain question stays small."""
from __future__ import annotations

import textwrap

import openai
import pytest

from thrifty.config import PriceSettings, RouterSettings, ServerSettings, ThriftyConfig, TierSettings
from thrifty.gateway.cascade import CascadeRouter
from thrifty.gateway.tiers import build_gateway
from thrifty.server.app import create_gateway_app
from thrifty.server.background import ServerThread

ENGINE = dict(dtype="float32", num_kv_blocks=128, block_size=16)
CODING = textwrap.dedent('''\
    Write the Python function below.
    ```python
    def add(a: int, b: int) -> int:
        """ Add two numbers.
        >>> add(2, 3)
        5
        """
    ```''')


@pytest.fixture(scope="module")
def client(tiny_gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cascade")
    config = ThriftyConfig(
        model_list=[TierSettings("small", str(tiny_gguf), dict(ENGINE), price=PriceSettings(1.0, 0.1, 2.0)),
                    TierSettings("large", str(tiny_gguf), dict(ENGINE), price=PriceSettings(5.0, 0.5, 10.0))],
        router=RouterSettings(strategy="cascade", check="code", retries=0),
        server=ServerSettings(ledger_path=str(tmp / "ledger.sqlite3")))
    gateway = build_gateway(config)
    assert isinstance(gateway.router, CascadeRouter)
    with ServerThread(create_gateway_app(gateway, config.server)) as srv:
        srv.gateway = gateway
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0), srv


def test_cascade_escalates_a_coding_answer_without_code(client):
    c, srv = client
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": CODING}],
                                                      max_tokens=8, temperature=0)
    r = raw.parse()
    # a random model writes no code block: the check fails and the large tier answers
    assert raw.headers["x-thrifty-route"] in ("large; cascade: no code", "large; cascade: answer cut at max_tokens")
    charges = [ch for ch in srv.gateway.ledger.charges() if ch.request_id == r.id]
    assert [ch.tier for ch in charges] == ["small", "large"]
    assert float(raw.headers["x-thrifty-cost"]) == pytest.approx(sum(ch.cost_usd for ch in charges), abs=1e-8)


def test_cascade_keeps_a_plain_answer_on_the_small_tier(client):
    c, srv = client
    # common stop strings end the random model's answer early, so it is neither cut off nor code
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0,
        stop=[" ", "e", "a"])
    r = raw.parse()
    assert r.choices[0].finish_reason == "stop"
    assert raw.headers["x-thrifty-route"] == "small; cascade: check passed"
    assert [ch.tier for ch in srv.gateway.ledger.charges() if ch.request_id == r.id] == ["small"]
