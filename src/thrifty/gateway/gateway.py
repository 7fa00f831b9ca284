"""The gateway: route -> backend (with fallback) -> cascade check -> book the cost.

`Gateway.generate(request)` is what the server calls for every request the response cache did not
answer. `model: "auto"` asks the router for a tier; naming a tier (or a local tier's model) pins it.

- Fallback (thrifty.gateway.fallback): a tier that fails or times out before its first output falls to
  the next tier. Once the first output has gone on, the answer is committed to that tier: fallback is
  only possible before the first byte went to the client.
- Cascade (router strategy `cascade`, `auto` requests only): each tier but the last answers in full and
  in a buffer, with its sampled tokens' logprobs (asked for internally, shown only to clients that asked
  for logprobs themselves); the router checks the answer and may send the request one tier up. A
  streamed cascade request therefore waits for the cheap tier's whole answer before its first byte.
- Ledger: just before the final output is handed on, the request's charges are booked (every tier it
  ran on; a cascade that escalated pays for both answers), and the request's route, tier and cost are
  written onto it for the response headers (x-thrifty-route, x-thrifty-cost).

Policy (the router), execution (the backends) and bookkeeping (the ledger) stay in their own modules;
this one only wires them together.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from thrifty.config import RouterSettings
from thrifty.engine.engine import RequestOutput, Usage
from thrifty.gateway.backends import Backend, BackendError, BackendRequest, TierTimeoutError
from thrifty.gateway.costs import Price, request_cost
from thrifty.gateway.fallback import Fallback
from thrifty.gateway.ledger import Charge, Ledger
from thrifty.gateway.router import Answer, Route, RouteRequest, Router, next_tier

log = logging.getLogger("thrifty.gateway")
AUTO = "auto"


class GatewayRequest(BackendRequest, Protocol):
    """A backend request plus what the gateway reads (target, requested) and writes (the rest)."""
    target: str | None                       # the pinned tier; None: the router chooses (`auto`)
    requested: str                           # the model name the client sent
    model: str                               # the model name the response shows (the tier that answered)
    tier: str | None
    route: str | None                        # "tier; reason", for x-thrifty-route
    cost: float | None                       # USD, for x-thrifty-cost


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
class RoutedOutput(RequestOutput):
    """The final output of a request, tagged with the tier that produced it (for coalesced followers
    and cache entries, which book and replay it later)."""
    tier: str = ""


class Gateway:
    def __init__(self, tiers: list[Tier], router: Router, settings: RouterSettings | None = None,
                 ledger: Ledger | None = None) -> None:
        if not tiers:
            raise ValueError("a gateway needs at least one tier")
        self.tiers = {t.name: t for t in tiers}
        self.names = [t.name for t in tiers]                       # cheapest first
        self.router = router
        self.settings = settings or RouterSettings()
        self.ledger = ledger if ledger is not None else Ledger(None)
        # the baseline: the most expensive tier by output price (the later one on a tie, normally the last)
        self.baseline = max(reversed(tiers), key=lambda t: t.price.output)
        self.fallback = Fallback(self.settings, {t.name: t.timeout_s for t in tiers})
        self._names: dict[str, str | None] = {AUTO: None}
        for t in tiers:
            self._names[t.name] = t.name
        for t in tiers:
            for alias in t.aliases:
                self._names.setdefault(alias, t.name)  # a tier's own name wins over another's alias

    # ---- names -------------------------------------------------------------------------------------
    def resolve(self, model: str) -> tuple[bool, str | None]:
        """(served, target): target None means `auto`."""
        if model not in self._names:
            return False, None
        return True, self._names[model]

    def accepted_names(self) -> set[str]:
        return set(self._names)

    def listed_names(self) -> list[str]:
        """What GET /v1/models lists: the tiers, and `auto` when there is a choice to make."""
        return self.names + [AUTO] if len(self.names) > 1 else list(self.names)

    def local_engine(self, target: str | None) -> Any:
        """The AsyncEngine that prepares requests for `target` (auto: the cheapest local tier), or None."""
        tiers = [self.tiers[target]] if target is not None else list(self.tiers.values())
        return next((t.backend.engine for t in tiers if not t.remote), None)

    def local_engines(self) -> list[Any]:
        return [t.backend.engine for t in self.tiers.values() if not t.remote]

    def static_route(self, target: str | None) -> str | None:
        """The route when it is certain before anything runs (one tier, or a pinned tier without fallback)."""
        if len(self.names) == 1:
            return f"{self.names[0]}; {'pinned' if target else 'only tier'}"
        return None

    # ---- generation --------------------------------------------------------------------------------
    async def generate(self, p: GatewayRequest) -> AsyncIterator[RequestOutput]:
        rr = route_request(p)
        route = await self._choose(p, rr)
        tier, reason = route.tier, route.reason
        spent: list[Charge] = []
        cascade = p.target is None and self.router.strategy == "cascade"
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
            self._commit(p, used, reason)
            async for out in self._follow(p, used, first, gen, spent):
                yield out
            return
        self._commit(p, used, reason)
        for out in outputs[:-1]:
            yield out
        self._book(p, used, final.usage, spent)
        yield _tag(final, used)

    async def _choose(self, p: GatewayRequest, rr: RouteRequest) -> Route:
        if p.target is not None:
            return Route(p.target, "pinned")
        if self.router.strategy == "fixed":  # no model to run: not worth a thread hop
            return self.router.choose(rr)
        return await asyncio.to_thread(self.router.choose, rr)

    async def _prime(self, tier: str, p: GatewayRequest) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
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

    async def _buffer(self, tier: str, p: GatewayRequest) -> list[RequestOutput]:
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

    async def _follow(self, p: GatewayRequest, tier: str, first: RequestOutput,
                      gen: AsyncIterator[RequestOutput], spent: list[Charge]) -> AsyncIterator[RequestOutput]:
        """The committed stream: a tier silent for longer than its timeout ends it with an error."""
        timeout = self.tiers[tier].timeout_s
        out, last, booked = first, None, False
        try:
            while True:
                last = out
                if out.finished:
                    self._book(p, tier, out.usage, spent)
                    booked = True
                    yield _tag(out, tier)
                    return
                yield out
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
                self._book(p, tier, last.usage, spent, note="; unfinished")

    # ---- bookkeeping -------------------------------------------------------------------------------
    def _commit(self, p: GatewayRequest, tier: str, reason: str) -> None:
        p.tier, p.route, p.model = tier, f"{tier}; {reason}", tier

    def _charge(self, p: GatewayRequest, tier: str, usage: Usage, route: str, final: bool = True) -> Charge:
        cost = request_cost(self.tiers[tier].price, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        baseline = (request_cost(self.baseline.price, usage.prompt_tokens, usage.cached_tokens,
                                 usage.completion_tokens) if final else 0.0)
        return Charge(p.request_id, tier, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
                      cost, baseline, 0.0, final, p.requested, route)

    def _book(self, p: GatewayRequest, tier: str, usage: Usage, spent: list[Charge], note: str = "") -> None:
        charges = [*spent, self._charge(p, tier, usage, (p.route or tier) + note)]
        p.cost = sum(c.cost_usd for c in charges)
        self._record(charges)

    def book_cached(self, p: GatewayRequest, tier: str | None, kind: str, prompt_tokens: int,
                    completion_tokens: int) -> None:
        """An answer from the response cache or a coalesced request: it costs nothing and saves what it
        would have cost (all of its prompt computed) on the tier that first produced it."""
        if tier not in self.tiers:  # an entry from before tiers were recorded, or a renamed tier
            tier = p.target or self.names[0]
        would = request_cost(self.tiers[tier].price, prompt_tokens, 0, completion_tokens)
        baseline = request_cost(self.baseline.price, prompt_tokens, 0, completion_tokens)
        p.tier, p.route, p.cost, p.model = tier, f"{tier}; cache {kind}", 0.0, tier
        self._record([Charge(p.request_id, tier, prompt_tokens, prompt_tokens, completion_tokens, 0.0, baseline,
                             would, True, p.requested, p.route, kind)])

    def _record(self, charges: list[Charge]) -> None:
        try:
            self.ledger.book(charges)
        except Exception as e:  # noqa: BLE001 -- a ledger that cannot write must not fail the answer
            log.error("the cost ledger could not record request %s: %s", charges[-1].request_id, e)

    async def close(self) -> None:
        for t in self.tiers.values():
            await t.backend.close()
        self.ledger.close()


def route_request(p: GatewayRequest) -> RouteRequest:
    """What the router sees: the last user message (chat) or the prompt."""
    if p.chat:
        msgs = p.messages or []
        text = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), "")
        return RouteRequest(text or "", msgs)
    if isinstance(p.prompt, str):
        return RouteRequest(p.prompt)
    tok = p.tokenizer
    return RouteRequest(tok.decode(list(p.prompt or [])) if tok is not None else "")


def _answer(out: RequestOutput) -> Answer:
    return Answer(out.text, [lp.logprob for lp in out.logprobs], out.finish_reason)


def _fallback_note(wanted: str, used: str) -> str:
    return f"; fallback from {wanted}" if used != wanted else ""


def _tag(out: RequestOutput, tier: str) -> RoutedOutput:
    return RoutedOutput(*(getattr(out, f.name) for f in dataclasses.fields(RequestOutput)), tier=tier)
