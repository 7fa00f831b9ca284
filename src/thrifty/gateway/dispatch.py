"""Route -> backend (with fallback) -> cascade check -> book the cost: the part of the gateway's path after
the caches.

- Fallback (thrifty.gateway.fallback): a tier that fails or times out before its first output falls to
  the next tier. Once the first output has gone on, the answer is committed to that tier: fallback is
  only possible before the first byte went to the client.
- Cascade (router strategy `cascade`, `auto` requests only): each tier but the last answers in full and
  in a buffer, with its sampled tokens' logprobs (asked for internally, shown only to clients that asked
  for logprobs themselves); the router checks the answer and may send the request one tier up. A
  streamed cascade request therefore waits for the cheap tier's whole answer before its first byte.
- Ledger: just before the final output is handed on, the request's charges are booked (every tier it
  ran on; a cascade that escalated pays for both answers), and the final output carries the cost.

Every output is tagged with the tier that produced it and the route ("tier; reason").
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from thrifty.config import RouterSettings
from thrifty.engine.engine import RequestOutput, Usage
from thrifty.gateway.backends import Backend, BackendError, TierTimeoutError
from thrifty.gateway.costs import Price, request_cost
from thrifty.gateway.fallback import Fallback
from thrifty.gateway.ledger import Charge, Ledger
from thrifty.gateway.request import BackendRequest, GatewayOutput, tag
from thrifty.gateway.router import Answer, Route, RouteRequest, Router, next_tier

log = logging.getLogger("thrifty.gateway")


@dataclass(slots=True)
class Tier:
    name: str
    backend: Backend
    price: Price
    aliases: tuple[str, ...] = ()            # other names that pin this tier (a local tier's model)
    timeout_s: float = 120.0

    @property
    def remote(self) -> bool:
        return self.backend.remote


@dataclass(slots=True)
class Booking:
    """What a request was charged: its tier, route and cost."""
    tier: str
    route: str
    cost: float


class Dispatcher:
    def __init__(self, tiers: list[Tier], router: Router, settings: RouterSettings, ledger: Ledger) -> None:
        self.tiers = {t.name: t for t in tiers}
        self.names = [t.name for t in tiers]                       # cheapest first
        self.router, self.settings, self.ledger = router, settings, ledger
        # the baseline: the most expensive tier by output price (the later one on a tie, normally the last)
        self.baseline = max(reversed(tiers), key=lambda t: t.price.output)
        self.fallback = Fallback(settings, {t.name: t.timeout_s for t in tiers})

    async def generate(self, p: BackendRequest, target: str | None, cache: str | None = None
                       ) -> AsyncIterator[GatewayOutput]:
        """`p`'s outputs from the tier `target` pins (None: the router's choice), tagged with `cache` too."""
        rr = self.route_request(p)
        route = await self._choose(target, rr)
        tier, reason = route.tier, route.reason
        spent: list[Charge] = []
        cascade = target is None and self.router.strategy == "cascade"
        while cascade and next_tier(self.names, tier) is not None:
            used, outputs, _ = await self.fallback.run(self.names, tier, lambda t: self._buffer(t, p))
            reason += _fallback_note(tier, used)
            final = outputs[-1]
            if next_tier(self.names, used) is None:
                break
            up, why = await asyncio.to_thread(self.router.escalate, rr, _answer(final), used)
            reason = why  # the router's own words, e.g. "cascade: examples failed"
            if not up:
                break
            spent.append(self._charge(p, used, final.usage, f"{used}; {reason}", final=False))
            tier = next_tier(self.names, used)
        else:
            used, (first, gen), _ = await self.fallback.run(self.names, tier, lambda t: self._prime(t, p))
            reason += _fallback_note(tier, used)
            async for out in self._follow(p, used, f"{used}; {reason}", first, gen, spent, cache):
                yield out
            return
        route_text = f"{used}; {reason}"
        for out in outputs[:-1]:
            yield tag(out, tier=used, route=route_text, cache=cache)
        cost = self._book(p, used, route_text, final.usage, spent)
        yield tag(final, tier=used, route=route_text, cache=cache, cost=cost)

    def route_request(self, p: BackendRequest) -> RouteRequest:
        """What the router sees: the last user message (chat) or the prompt."""
        if p.chat:
            msgs = p.messages or []
            text = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), "")
            return RouteRequest(text or "", msgs)
        if isinstance(p.prompt, str):
            return RouteRequest(p.prompt)
        checker = self.tiers.get(p.checked_by)
        tok = getattr(checker.backend, "tokenizer", None) if checker is not None and not checker.remote else None
        return RouteRequest(tok.decode(list(p.prompt or [])) if tok is not None else "")

    async def _choose(self, target: str | None, rr: RouteRequest) -> Route:
        if target is not None:
            return Route(target, "pinned")
        if self.router.strategy == "fixed":  # no model to run: not worth a thread hop
            return self.router.choose(rr)
        return await asyncio.to_thread(self.router.choose, rr)

    async def _prime(self, tier: str, p: BackendRequest) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        """Start `tier` and wait for its first output (what fallback may still undo)."""
        gen = self.tiers[tier].backend.generate(p)
        try:
            first = await anext(gen)
        except StopAsyncIteration:
            raise BackendError(tier, "the answer ended before it began") from None
        except BaseException:
            await gen.aclose()
            raise
        return first, gen

    async def _buffer(self, tier: str, p: BackendRequest) -> list[RequestOutput]:
        """`tier`'s whole answer, with the sampled tokens' logprobs, for the cascade to check."""
        outputs = []
        gen = self.tiers[tier].backend.generate(p, logprobs=True)
        try:
            async for out in gen:
                outputs.append(out)
        finally:
            await gen.aclose()
        if not outputs or not outputs[-1].finished:
            raise BackendError(tier, "the answer ended before it finished")
        return outputs

    async def _follow(self, p: BackendRequest, tier: str, route: str, first: RequestOutput,
                      gen: AsyncIterator[RequestOutput], spent: list[Charge], cache: str | None
                      ) -> AsyncIterator[GatewayOutput]:
        """The committed stream: a tier silent for longer than its timeout ends it with an error."""
        timeout = self.tiers[tier].timeout_s
        out, last, booked = first, None, False
        try:
            while True:
                last = out
                if out.finished:
                    cost = self._book(p, tier, route, out.usage, spent)
                    booked = True
                    yield tag(out, tier=tier, route=route, cache=cache, cost=cost)
                    return
                yield tag(out, tier=tier, route=route, cache=cache)
                try:
                    async with asyncio.timeout(timeout):
                        out = await anext(gen)
                except StopAsyncIteration:
                    raise BackendError(tier, "the answer ended before it finished") from None
                except TimeoutError:
                    raise TierTimeoutError(tier, f"no output for {timeout:g} s in the middle of an answer") from None
        finally:
            await gen.aclose()
            if not booked and last is not None:  # the client left, or the tier broke: what ran is still paid
                self._book(p, tier, route + "; unfinished", last.usage, spent)

    # ---- bookkeeping -------------------------------------------------------------------------------
    def _charge(self, p: BackendRequest, tier: str, usage: Usage, route: str, final: bool = True) -> Charge:
        cost = request_cost(self.tiers[tier].price, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        baseline = (request_cost(self.baseline.price, usage.prompt_tokens, usage.cached_tokens,
                                 usage.completion_tokens) if final else 0.0)
        return Charge(p.request_id, tier, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
                      cost, baseline, 0.0, final, p.request.model, route, key_id=p.request.key_id or "")

    def _book(self, p: BackendRequest, tier: str, route: str, usage: Usage, spent: list[Charge]) -> float:
        charges = [*spent, self._charge(p, tier, usage, route)]
        self._record(charges)
        return sum(c.cost_usd for c in charges)

    def book_cached(self, request_id: str, requested: str, tier: str | None, fallback_tier: str, kind: str,
                    prompt_tokens: int, completion_tokens: int) -> Booking:
        """An answer from the response cache or a coalesced request: it costs nothing and saves what it
        would have cost (all of its prompt computed) on the tier that first produced it (`fallback_tier`
        when that tier is gone)."""
        if tier not in self.tiers:  # an entry from before tiers were recorded, or a renamed tier
            tier = fallback_tier
        would = request_cost(self.tiers[tier].price, prompt_tokens, 0, completion_tokens)
        baseline = request_cost(self.baseline.price, prompt_tokens, 0, completion_tokens)
        route = f"{tier}; cache {kind}"
        self._record([Charge(request_id, tier, prompt_tokens, prompt_tokens, completion_tokens, 0.0, baseline,
                             would, True, requested, route, kind)])
        return Booking(tier, route, 0.0)

    def _record(self, charges: list[Charge]) -> None:
        try:
            self.ledger.book(charges)
        except Exception as e:  # noqa: BLE001 -- a ledger that cannot write must not fail the answer
            log.error("the cost ledger could not record request %s: %s", charges[-1].request_id, e)


def _answer(out: RequestOutput) -> Answer:
    return Answer(out.text, [lp.logprob for lp in out.logprobs], out.finish_reason)


def _fallback_note(wanted: str, used: str) -> str:
    return f"; fallback from {wanted}" if used != wanted else ""
