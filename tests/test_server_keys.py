"""Virtual API keys (thrifty keys add|list|revoke, server.virtual_keys): stored hashed; each key's requests and
tokens per minute and its USD budget hold (429 / 402 with Retry-After), per key; the master key has no limits;
a revoked key is refused on its next request; the ledger books spend under the key's id."""
from __future__ import annotations

import httpx
import pytest

from thrifty.cli import main
from thrifty.config import RouterSettings, ServerSettings
from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.errors import InvalidRequestError
from thrifty.gateway.backends import LocalBackend
from thrifty.gateway.costs import Price
from thrifty.gateway.gateway import Gateway, Tier
from thrifty.gateway.router import FixedRouter
from thrifty.server.api_keys import KeyStore, key_id_of
from thrifty.server.app import create_gateway_app
from thrifty.server.background import ServerThread
from thrifty.server.key_limits import period_bounds

MASTER = "sk-master-4711"
PRICE = Price(1000.0, 1000.0, 1000.0)      # USD per 1M tokens: a 10-token answer costs about a cent


def test_the_store_keeps_hashes_and_revokes(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite3")
    secret, key = store.add("team-a", rpm=5, budget_usd=2.5, period="day")
    assert key.key_id == key_id_of(secret) and secret not in key.key_id
    assert secret.encode() not in (tmp_path / "keys.sqlite3").read_bytes()
    assert store.lookup(secret) == key and store.lookup(secret + "x") is None
    assert [k.key_id for k in store.list()] == [key.key_id]
    assert store.revoke(key.key_id) and not store.revoke(key.key_id)
    assert store.lookup(secret) is None and store.list()[0].revoked
    for bad in (dict(tenant=""), dict(tenant="t", rpm=0), dict(tenant="t", budget_usd=-1.0),
                dict(tenant="t", period="week")):
        with pytest.raises(InvalidRequestError):
            store.add(**bad)


def test_keys_cli(tmp_path, capsys):
    path = str(tmp_path / "k.sqlite3")
    assert main(["keys", "add", "--tenant", "team-b", "--rpm", "3", "--tpm", "1000", "--path", path]) == 0
    out = capsys.readouterr().out
    key_id, secret = out.split()[0], out.split(": ")[1].split()[0]
    assert key_id.startswith("key-") and secret.startswith("sk-thrifty-")
    assert main(["keys", "list", "--path", path]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "team-b" in listed and "active" in listed and secret not in listed
    assert main(["keys", "revoke", key_id, "--path", path]) == 0
    assert main(["keys", "revoke", key_id, "--path", path]) == 2
    assert main(["keys", "list", "--path", path]) == 0 and "revoked" in capsys.readouterr().out


def test_period_bounds():
    start, end = period_bounds("day", 1_700_000_000.0)          # 2023-11-14 22:13 UTC
    assert (start, end) == (1_699_920_000, 1_700_006_400)
    start, end = period_bounds("month", 1_700_000_000.0)
    assert (start, end) == (1_698_796_800, 1_701_388_800)        # 2023-11-01 .. 2023-12-01
    assert period_bounds("month", 1_703_980_800.0)[1] == 1_704_067_200   # December rolls into January


@pytest.fixture()
def served(tiny_gguf, tmp_path):
    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=128)
    gateway = Gateway([Tier("tiny", LocalBackend("tiny", AsyncEngine(engine)), PRICE)], FixedRouter("tiny"),
                      RouterSettings(retries=0))
    store = KeyStore(tmp_path / "keys.sqlite3")
    app = create_gateway_app(gateway, ServerSettings(max_output_tokens=64), MASTER, keys=store)
    with ServerThread(app) as srv:
        srv.store, srv.gateway = store, gateway
        yield srv


def ask(server, secret: str, tokens: int = 4) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}
    return httpx.post(server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {secret}"}, timeout=60)


def test_requests_per_minute_per_key(served):
    limited, _ = served.store.add("team-a", rpm=2)
    other, _ = served.store.add("team-b", rpm=2)
    assert [ask(served, limited).status_code for _ in range(2)] == [200, 200]
    r = ask(served, limited)
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 61
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and limited not in r.text
    assert ask(served, other).status_code == 200                  # each key has its own window
    assert all(ask(served, MASTER).status_code == 200 for _ in range(3))   # the master key: no limits


def test_tokens_per_minute(served):
    secret, _ = served.store.add("team-c", tpm=30)
    first = ask(served, secret, tokens=8)
    used = first.json()["usage"]["total_tokens"]
    assert first.status_code == 200 and used < 30
    statuses = [ask(served, secret, tokens=8).status_code for _ in range(30 // used + 1)]
    assert statuses[-1] == 429 and statuses[0] == 200


def test_budget_from_the_ledger(served):
    secret, key = served.store.add("team-d", budget_usd=0.005, period="day")
    first = ask(served, secret, tokens=8)
    assert first.status_code == 200
    spent = served.gateway.ledger.spend(key.key_id, 0.0)
    assert spent == pytest.approx(float(first.headers["x-thrifty-cost"])) and spent > 0.005
    r = ask(served, secret)
    assert r.status_code == 402 and r.json()["error"]["type"] == "insufficient_quota"
    assert int(r.headers["Retry-After"]) <= 86400
    assert [c.key_id for c in served.gateway.ledger.charges()][-1] == key.key_id


def test_revoked_and_unknown_keys_are_401(served):
    secret, key = served.store.add("team-e")
    assert ask(served, secret).status_code == 200
    served.store.revoke(key.key_id)
    assert ask(served, secret).status_code == 401
    assert ask(served, "sk-thrifty-made-up").status_code == 401
    assert httpx.get(served.url + "/v1/models", headers={"Authorization": f"Bearer {MASTER}"}).status_code == 200
