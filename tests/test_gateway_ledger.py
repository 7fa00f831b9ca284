"""Cost arithmetic by hand: auto prices, one request's cost, the baseline, a cascade that pays both answers,
cache-hit savings; the ledger's SQLite file, totals, --since, table and plot."""
from __future__ import annotations

import asyncio
import time

import pytest

from router_fakes import ScriptedCascade
from test_gateway_fallback import FakeBackend, request
from thrifty.config import RouterSettings
from thrifty.gateway.costs import Price, auto_price, request_cost
from thrifty.gateway.gateway import Gateway, Tier
from thrifty.gateway.ledger import Charge, Ledger, summarize

SMALL, LARGE = Price(1.0, 0.5, 2.0), Price(10.0, 5.0, 20.0)
# FakeBackend usage: 10 prompt tokens (4 of them prefix-cached), one completion token per word


def cascade_gateway(ledger: Ledger | None = None) -> tuple[Gateway, FakeBackend, FakeBackend, ScriptedCascade]:
    small, large = FakeBackend("small", "a b"), FakeBackend("large", "x y z")
    router = ScriptedCascade("hard")
    gw = Gateway([Tier("small", small, SMALL), Tier("large", large, LARGE)], router, RouterSettings(), ledger)
    return gw, small, large, router


def ask(gw: Gateway, text: str):
    p = request()
    p.messages = [{"role": "user", "content": text}]

    async def main():
        return [out async for out in gw.generate(p)]

    return p, asyncio.run(main())


def test_auto_price_and_request_cost_by_hand():
    price = auto_price(0.36, 1000.0, 100.0, 0.1)  # 0.0001 USD/s
    assert price.input == pytest.approx(0.1) and price.output == pytest.approx(1.0)
    assert price.cached_input == pytest.approx(0.01)
    # 800 uncached x 0.1 + 200 cached x 0.01 + 50 out x 1.0 = 132 USD per 1M
    assert request_cost(price, 1000, 200, 50) == pytest.approx(132e-6)
    assert request_cost(Price(3.0, 1.5, 15.0), 0, 0, 0) == 0.0
    with pytest.raises(ValueError):
        auto_price(0.1, 0.0, 10.0, 0.1)


def test_cascade_that_passes_pays_the_small_tier_only():
    gw, small, large, router = cascade_gateway()
    p, outs = ask(gw, "easy question")
    assert outs[-1].text == "a b" and large.calls == 0
    assert outs[-1].route == "small; cascade: check passed"
    # the check saw the sampled tokens' logprobs, asked for internally
    assert small.logprobs_asked == [True] and router.answers[0].token_logprobs == [-0.5, -0.5]
    assert outs[-1].cost == pytest.approx((6 * 1.0 + 4 * 0.5 + 2 * 2.0) / 1e6)     # 12e-6
    (charge,) = gw.ledger.charges()
    assert charge.final and charge.baseline_usd == pytest.approx((6 * 10 + 4 * 5 + 2 * 20) / 1e6)  # 120e-6
    total = gw.ledger.report().total
    assert total.saved_routing_usd == pytest.approx(108e-6) and total.saved_cache_usd == 0.0


def test_escalated_cascade_pays_both_answers():
    gw, small, large, _ = cascade_gateway()
    p, outs = ask(gw, "hard question")
    assert outs[-1].text == "x y z" and outs[-1].route == "large; cascade: examples failed"
    assert outs[-1].tier == "large"
    assert large.logprobs_asked == [False]  # the top tier streams: nothing to check after it
    cost_small, cost_large = 12e-6, (6 * 10 + 4 * 5 + 3 * 20) / 1e6               # 140e-6
    assert outs[-1].cost == pytest.approx(cost_small + cost_large)
    thrown, final = gw.ledger.charges()
    assert (thrown.tier, thrown.final, thrown.cost_usd, thrown.baseline_usd) == ("small", False,
                                                                                 pytest.approx(cost_small), 0.0)
    assert final.tier == "large" and final.baseline_usd == pytest.approx(cost_large)
    report = gw.ledger.report(order=gw.names)
    assert [t.name for t in report.by_tier] == ["small", "large"]
    assert report.total.requests == 1 and report.total.attempts == 2
    assert report.total.saved_routing_usd == pytest.approx(-cost_small)  # routing cost money here
    assert report.by_tier[0].requests == 0 and report.by_tier[0].cost_usd == pytest.approx(cost_small)


def test_cache_hit_costs_nothing_and_saves_its_tier_cost():
    gw, *_ = cascade_gateway()
    b = gw.book_cached(gw.prepare(request()), "small", "hit", prompt_tokens=10, completion_tokens=2)
    assert b.cost == 0.0 and b.route == "small; cache hit" and b.tier == "small"
    (charge,) = gw.ledger.charges()
    assert charge.cost_usd == 0.0 and charge.cache == "hit"
    assert charge.saved_cache_usd == pytest.approx((10 * 1.0 + 2 * 2.0) / 1e6)     # all of the prompt computed
    assert charge.baseline_usd == pytest.approx((10 * 10.0 + 2 * 20.0) / 1e6)
    total = gw.ledger.report().total
    assert total.saved_cache_usd == pytest.approx(14e-6) and total.saved_routing_usd == pytest.approx(126e-6)
    # an entry from an unknown tier is booked on the request's own tier (auto: the cheapest)
    gw.book_cached(gw.prepare(request(target="large")), "gone", "coalesced", 10, 2)
    assert gw.ledger.charges()[-1].tier == "large"


def test_baseline_is_the_most_expensive_tier_by_output_price():
    tiers = [Tier("a", FakeBackend("a"), Price(1, 1, 1)), Tier("b", FakeBackend("b"), Price(5, 5, 50)),
             Tier("c", FakeBackend("c"), Price(9, 9, 9))]
    assert Gateway(tiers, ScriptedCascade("hard")).baseline.name == "b"
    same = [Tier("a", FakeBackend("a"), Price(1, 1, 5)), Tier("b", FakeBackend("b"), Price(2, 2, 5))]
    assert Gateway(same, ScriptedCascade("hard")).baseline.name == "b"  # a tie: the later tier


def test_ledger_persists_and_filters(tmp_path):
    path = tmp_path / "ledger" / "ledger.sqlite3"
    ledger = Ledger(path)
    old = Charge("r-old", "small", 100, 0, 10, 1e-4, 5e-4, ts=time.time() - 86400 * 10)
    new = Charge("r-new", "large", 50, 10, 5, 2e-4, 2e-4, model="auto", reason="large; classifier")
    hit = Charge("r-hit", "small", 50, 50, 5, 0.0, 2e-4, saved_cache_usd=1e-5, cache="hit")
    ledger.book([old, new, hit])
    ledger.close()
    again = Ledger(path)
    assert [c.request_id for c in again.charges()] == ["r-old", "r-new", "r-hit"]
    assert again.charges()[1].reason == "large; classifier" and again.charges()[2].cache == "hit"
    recent = again.report(since=time.time() - 86400)
    assert recent.total.requests == 2 and recent.total.cost_usd == pytest.approx(2e-4)
    assert recent.total.saved_cache_usd == pytest.approx(1e-5)
    assert recent.total.saved_routing_usd == pytest.approx(4e-4 - 2e-4 - 1e-5)
    whole = again.report()
    assert whole.total.requests == 3 and whole.total.prompt_tokens == 200
    table = whole.table()
    assert "| small" in table and "| large" in table and "| total" in table and "0.00070000" in table
    png = whole.plot(tmp_path / "cost.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again.close()


def test_summary_orders_tiers_cheapest_first():
    charges = [Charge("1", "zeta", 1, 0, 1, 0.1), Charge("2", "alpha", 1, 0, 1, 0.2), Charge("3", "other", 1, 0, 1, 0)]
    assert [t.name for t in summarize(charges, order=["zeta", "alpha"]).by_tier] == ["zeta", "alpha", "other"]
