"""Fallback in the gateway, on fake backends (no model): a tier that errors falls to the next, one that hangs
past its timeout too, failing tiers cool down and are skipped, retries wait with exponential backoff, a bad
request is not retried, and an answer that breaks after its first output is not replayed elsewhere."""
from __future__ import annotations

import asyncio

import pytest

from thrifty.config import RouterSettings
from thrifty.engine.engine import RequestOutput, Usage
from thrifty.engine.sampling import SamplingParams
from thrifty.engine.sequence import Logprob
from thrifty.errors import InvalidRequestError
from thrifty.gateway.backends import BackendError, TierTimeoutError
from thrifty.gateway.costs import Price
from thrifty.gateway.fallback import AllTiersFailedError
from thrifty.gateway.gateway import Gateway, Tier
from thrifty.gateway.router import FixedRouter
from thrifty.gateway.request import BackendRequest, GatewayOutput, GatewayRequest


class FakeBackend:
    """Answers `text` word by word; fails its first `fail` calls; `hang`: never answers; `break_after`: raises
    after that many outputs."""

    remote = False

    def __init__(self, name: str, text: str = "fine answer", fail: int = 0, hang: bool = False,
                 break_after: int | None = None, error: Exception | None = None) -> None:
        self.name, self.text, self.fail, self.hang, self.break_after = name, text, fail, hang, break_after
        self.error = error
        self.calls = 0
        self.logprobs_asked: list[bool] = []

    def prepare(self, request: GatewayRequest) -> BackendRequest:
        return BackendRequest(request, [1, 2, 3], request.params, self.name)

    async def generate(self, request, logprobs: bool = False):
        self.calls += 1
        self.logprobs_asked.append(logprobs)
        if self.calls <= self.fail:
            raise self.error or BackendError(self.name, "HTTP 503: overloaded")
        if self.hang:
            await asyncio.sleep(3600)
        words = self.text.split(" ")
        text = ""
        for i, w in enumerate(words):
            if self.break_after is not None and i == self.break_after:
                raise BackendError(self.name, "connection reset")
            piece = w if i == 0 else " " + w
            text += piece
            last = i == len(words) - 1
            yield RequestOutput(request.request_id, None, [], text, [], piece, [], last, "stop" if last else None,
                                None, [Logprob(1, -0.5, None)] * (i + 1), Usage(10, 4, i + 1, None, None))

    async def warm_up(self) -> None:
        pass

    async def close(self) -> None:
        pass


def request(target: str | None = None) -> GatewayRequest:
    return GatewayRequest("req-1", target or "auto", chat=True, messages=[{"role": "user", "content": "hello"}],
                          params=SamplingParams(temperature=0.0))


def gateway(*backends: FakeBackend, settings: RouterSettings | None = None, timeouts: dict | None = None,
            first: str | None = None) -> Gateway:
    tiers = [Tier(b.name, b, Price(1.0, 0.5, 2.0 * (i + 1)), timeout_s=(timeouts or {}).get(b.name, 30.0))
             for i, b in enumerate(backends)]
    gw = Gateway(tiers, FixedRouter(first or backends[0].name), settings or RouterSettings(backoff_s=0.0))
    gw.fallback.sleep = _no_sleep
    return gw


async def _no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


def run(gw: Gateway, p: GatewayRequest) -> list[GatewayOutput]:
    async def main():
        return [out async for out in gw.generate(p)]
    return asyncio.run(main())


def test_erroring_tier_falls_to_the_next():
    small, large = FakeBackend("small", fail=99), FakeBackend("large", "from large")
    p = request()
    outs = run(gateway(small, large), p)
    assert outs[-1].text == "from large" and outs[-1].finished
    assert small.calls == 2  # one try + one retry (router.retries=1), then the next tier
    assert outs[-1].tier == "large" and outs[-1].route == "large; fixed; fallback from small"
    assert outs[-1].cost == pytest.approx((6 * 1.0 + 4 * 0.5 + 2 * 4.0) / 1e6)


def test_fallback_wraps_to_cheaper_tiers():
    small, large = FakeBackend("small", "from small"), FakeBackend("large", fail=99)
    p = request(target="large")
    outs = run(gateway(small, large), p)
    assert outs[-1].text == "from small" and outs[-1].route == "small; pinned; fallback from large"
    assert large.calls == 2 and outs[-1].tier == "small"


def test_hanging_tier_times_out_and_falls_back():
    slow, fast = FakeBackend("slow", hang=True), FakeBackend("fast", "in time")
    gw = gateway(slow, fast, settings=RouterSettings(retries=0), timeouts={"slow": 0.2})
    outs = run(gw, request())
    assert outs[-1].text == "in time"
    assert slow.calls == 1 and outs[-1].tier == "fast"


def test_retry_waits_with_exponential_backoff():
    flaky = FakeBackend("flaky", "third time lucky", fail=2)
    gw = gateway(flaky, FakeBackend("other"), settings=RouterSettings(retries=3, backoff_s=0.5))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    gw.fallback.sleep = sleep
    outs = run(gw, request())
    assert outs[-1].text == "third time lucky"
    assert flaky.calls == 3 and waits == [0.5, 1.0] and outs[-1].tier == "flaky"


def test_failing_tier_cools_down_and_is_skipped():
    now = [1000.0]
    small, large = FakeBackend("small", "small ok", fail=2), FakeBackend("large", "large ok")
    gw = gateway(small, large, settings=RouterSettings(retries=1, backoff_s=0.0, cooldown_s=30.0))
    gw.fallback.clock = lambda: now[0]
    assert run(gw, request())[-1].text == "large ok"        # small failed twice: cooling from now on
    assert small.calls == 2 and gw.fallback.cooling("small")
    now[0] += 10
    assert run(gw, request())[-1].text == "large ok"        # skipped while cooling
    assert small.calls == 2
    now[0] += 25                                            # the cooldown is over: small answers again
    assert run(gw, request())[-1].text == "small ok" and small.calls == 3


def test_cooling_tier_is_still_tried_when_no_other_is_left():
    now = [0.0]
    small, large = FakeBackend("small", "small ok", fail=1), FakeBackend("large", fail=99)
    gw = gateway(small, large, settings=RouterSettings(retries=0, cooldown_s=60.0))
    gw.fallback.clock = lambda: now[0]
    with pytest.raises(AllTiersFailedError) as e:
        run(gw, request())
    assert "small" in str(e.value) and "large" in str(e.value)
    assert gw.fallback.cooling("small") and gw.fallback.cooling("large")
    assert run(gw, request())[-1].text == "small ok"         # both cool; small, the first in order, answers
    assert gw.fallback.order(["small", "large"], "small") == ["small", "large"]


def test_single_tier_raises_its_own_error():
    only = FakeBackend("only", fail=99, error=RuntimeError("engine step failed"))
    with pytest.raises(RuntimeError, match="engine step failed"):
        run(gateway(only, settings=RouterSettings(retries=0)), request())


def test_bad_request_is_not_retried_nor_passed_on():
    bad = FakeBackend("small", fail=99, error=InvalidRequestError("prompt too long", param="prompt"))
    other = FakeBackend("large")
    with pytest.raises(InvalidRequestError):
        run(gateway(bad, other), request())
    assert bad.calls == 1 and other.calls == 0
    assert not gateway(bad, other).fallback.cooling("small")


def test_no_fallback_after_the_first_output():
    """Once outputs went on (a stream's first byte), a broken tier ends the answer; it is not replayed."""
    broken, other = FakeBackend("small", "one two three", break_after=2), FakeBackend("large")
    gw = gateway(broken, other)
    p = request()
    seen = []

    async def main():
        async for out in gw.generate(p):
            seen.append(out.text)

    with pytest.raises(BackendError, match="connection reset"):
        asyncio.run(main())
    assert seen == ["one", "one two"] and other.calls == 0
    (charge,) = gw.ledger.charges()  # what ran is still booked
    assert charge.tier == "small" and charge.completion_tokens == 2 and charge.reason.endswith("unfinished")


def test_stalled_stream_times_out():
    class Stalls(FakeBackend):
        async def generate(self, request, logprobs=False):
            yield RequestOutput(request.request_id, None, [], "a", [], "a", [], False, None, None, [],
                                Usage(1, 0, 1, None, None))
            await asyncio.sleep(3600)
            yield  # pragma: no cover

    gw = gateway(Stalls("small"), FakeBackend("large"), timeouts={"small": 0.2})
    with pytest.raises(TierTimeoutError):
        run(gw, request())


def test_fallback_disabled_tries_one_tier():
    small, large = FakeBackend("small", fail=99), FakeBackend("large")
    with pytest.raises(BackendError):
        run(gateway(small, large, settings=RouterSettings(retries=0, fallback=False)), request())
    assert large.calls == 0
