"""The gateway: one request's whole policy, from the tenant's scope to the ledger.

    gateway = Gateway(tiers, router, cache=ResponseCache(...))
    async for out in gateway.generate(GatewayRequest("r1", "auto", messages=[...])):
        print(out.delta_text, end="")            # out.tier, out.route, out.cache, out.cost (last output)

`generate(request)` = `prepare(request)` (the target tier's backend tokenizes and checks it: a bad request
fails here, before anything runs) + `start(prepared)` (tenant scope -> exact cache -> semantic cache ->
coalescer -> router -> backend with fallback -> store -> ledger) + the outputs. A server calls the two
halves itself to admit the request in between, and reads the `Reply`'s cache outcome and route before
the first output. Model names: `auto` asks the router for a tier; a tier's name (or a local tier's model)
pins it.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from thrifty.config import CacheSettings, RouterSettings
from thrifty.errors import ModelNotServedError
from thrifty.gateway.cache import ResponseCache
from thrifty.gateway.cache.keys import CacheRequest
from thrifty.gateway.cache_policy import CachePolicy, model_identity, prompt_tokens, replay
from thrifty.gateway.coalesce import Coalescer
from thrifty.gateway.dispatch import Booking, Dispatcher, Tier
from thrifty.gateway.ledger import Ledger
from thrifty.gateway.request import BackendRequest, GatewayOutput, GatewayRequest, Reply, tag
from thrifty.gateway.router import Router

AUTO = "auto"
__all__ = ["AUTO", "Gateway", "Tier"]


class Gateway:
    def __init__(self, tiers: list[Tier], router: Router, settings: RouterSettings | None = None,
                 ledger: Ledger | None = None, cache: ResponseCache | None = None,
                 cache_settings: CacheSettings | None = None) -> None:
        if not tiers:
            raise ValueError("a gateway needs at least one tier")
        self._wire(Dispatcher(tiers, router, settings or RouterSettings(), ledger or Ledger(None)), cache,
                   cache_settings)

    def _wire(self, dispatch: Dispatcher, cache: ResponseCache | None, cache_settings: CacheSettings | None) -> None:
        self.dispatch = dispatch
        self.tiers, self.names, self.router = dispatch.tiers, dispatch.names, dispatch.router
        self.cache = cache
        self.caching = CachePolicy(cache, cache_settings or CacheSettings())
        self.coalescer = Coalescer()
        self._names: dict[str, str | None] = {AUTO: None}
        for t in self.tiers.values():
            self._names[t.name] = t.name
        for t in self.tiers.values():
            for alias in t.aliases:
                self._names.setdefault(alias, t.name)  # a tier's own name wins over another's alias
        self._model_ids: dict[str | None, str] = {}

    def with_cache(self, cache: ResponseCache | None, settings: CacheSettings | None = None) -> Gateway:
        """A gateway over these same tiers, router and ledger, behind `cache`."""
        gateway = object.__new__(Gateway)
        gateway._wire(self.dispatch, cache, settings)
        return gateway

    @property
    def ledger(self) -> Ledger:
        return self.dispatch.ledger

    @property
    def fallback(self):
        return self.dispatch.fallback

    @property
    def baseline(self) -> Tier:
        return self.dispatch.baseline

    # ---- names -------------------------------------------------------------------------------------
    def resolve(self, model: str) -> tuple[bool, str | None]:
        """(served, target): target None means `auto`."""
        if model not in self._names:
            return False, None
        return True, self._names[model]

    def target(self, model: str) -> str | None:
        """The tier `model` pins (None: `auto`), or ModelNotServedError."""
        served, target = self.resolve(model)
        if not served:
            raise ModelNotServedError(model, "', '".join(self.listed_names()))
        return target

    def accepted_names(self) -> set[str]:
        return set(self._names)

    def listed_names(self) -> list[str]:
        """What GET /v1/models lists: the tiers, and `auto` when there is a choice to make."""
        return self.names + [AUTO] if len(self.names) > 1 else list(self.names)

    def engine_snapshots(self) -> list[Any]:
        """Each local tier's EngineSnapshot (thread-safe: taken by the engine after each step)."""
        return [t.backend.stats_snapshot() for t in self.tiers.values() if not t.remote]

    def deadline_state(self, tier: str) -> tuple[Any, float] | None:
        """A local tier's (EngineSnapshot, timeout_s): what admission by deadline judges a prompt against."""
        t = self.tiers.get(tier)
        return (t.backend.stats_snapshot(), t.timeout_s) if t is not None and not t.remote else None

    def tokenizer(self, tier: str) -> Any:
        """The vocabulary `tier`'s token ids belong to (None: a remote or unknown tier)."""
        t = self.tiers.get(tier)
        return t.backend.tokenizer if t is not None and not t.remote else None

    def max_model_len(self, model: str) -> int | None:
        """The context of the local tier `model` pins (None: `auto` or a remote tier)."""
        target = self.resolve(model)[1]
        tier = self.tiers.get(target) if target is not None else None
        return tier.backend.max_model_len if tier is not None and not tier.remote else None

    def static_route(self, target: str | None) -> str | None:
        """The route when it is certain before anything runs (one tier)."""
        if len(self.names) == 1:
            return f"{self.names[0]}; {'pinned' if target else 'only tier'}"
        return None

    def model_id(self, target: str | None) -> str:
        """The cache's model identity of a pinned tier (its name and aliases), or of `auto` (every tier
        and the routing strategy: another router may answer differently)."""
        if target not in self._model_ids:
            if target is None:
                parts = [AUTO, self.router.strategy] + [self.model_id(t) for t in self.names]
                self._model_ids[None] = "||".join(parts)
            else:
                self._model_ids[target] = model_identity(target, {target, *self.tiers[target].aliases})
        return self._model_ids[target]

    # ---- the request's way -------------------------------------------------------------------------
    def prepare(self, request: GatewayRequest) -> BackendRequest:
        """`request` checked and tokenized by the backend of the tier it pins (`auto`: the cheapest local
        tier, else the cheapest); InvalidRequestError or ModelNotServedError when it is bad."""
        target = self.target(request.model)
        tiers = [self.tiers[target]] if target is not None else list(self.tiers.values())
        tier = next((t for t in tiers if not t.remote), tiers[0])
        return tier.backend.prepare(request)

    async def generate(self, request: GatewayRequest) -> AsyncIterator[GatewayOutput]:
        reply = await self.start(self.prepare(request))
        gen = reply.outputs
        try:
            async for out in gen:
                yield out
        finally:
            await gen.aclose()

    async def start(self, p: BackendRequest) -> Reply:
        """The cache answers, or the request joins an identical one in flight, or it goes to a tier."""
        target = self.target(p.request.model)
        if self.cache is None:
            return Reply(self.dispatch.generate(p, target), route=self.static_route(target))
        plan = self.caching.plan(p, self.model_id(target))
        if plan is None:
            return Reply(self.dispatch.generate(p, target, "bypass"), "bypass", route=self.static_route(target))
        lookup_s = None
        if plan.read:
            start = time.perf_counter()
            hit = await self.cache.lookup(plan)
            lookup_s = time.perf_counter() - start
            if hit is not None:
                r = hit.entry.response
                b = self.book_cached(p, r.get("tier"), hit.kind, prompt_tokens(p, r),
                                     int(r.get("completion_tokens", 0)))
                return Reply(replay(p, hit, b.tier, b.route), hit.kind, hit.similarity, lookup_s, b.route, 0.0,
                             b.tier)
        if self.caching.settings.coalesce and plan.read:
            return self._coalesce(p, target, plan, lookup_s)
        outputs = self.caching.store_after(self.dispatch.generate(p, target, "miss"), plan)
        return Reply(outputs, "miss", None, lookup_s, self.static_route(target))

    def _coalesce(self, p: BackendRequest, target: str | None, plan: CacheRequest, lookup_s: float | None) -> Reply:
        # stored as the last output passes (not when the flight lands): the leader's client may leave as soon
        # as it has the last output, and that cancels a flight whose tier is still closing its connection
        outputs, leader = self.coalescer.join(
            plan.key, lambda: self.caching.store_after(self.dispatch.generate(p, target, "miss"), plan))
        if leader:
            return Reply(outputs, "miss", None, lookup_s, self.static_route(target))
        return Reply(self._follow(p, outputs), "coalesced", None, lookup_s, self.static_route(target))

    async def _follow(self, p: BackendRequest, outputs: AsyncIterator[GatewayOutput]) -> AsyncIterator[GatewayOutput]:
        """A coalesced request computed nothing itself: its usage says all of its prompt was cached, and
        the ledger books it as free (saving what the leader's tier charged)."""
        try:
            async for out in outputs:
                u = out.usage
                usage = type(u)(u.prompt_tokens, u.prompt_tokens, u.completion_tokens, None, None)
                tags: dict[str, Any] = dict(usage=usage, request_id=p.request_id, cache="coalesced")
                if out.finished:
                    b = self.book_cached(p, out.tier, "coalesced", u.prompt_tokens, u.completion_tokens)
                    tags.update(tier=b.tier, route=b.route, cost=b.cost)
                yield tag(out, **tags)
        finally:
            await outputs.aclose()

    def book_cached(self, p: BackendRequest, tier: str | None, kind: str, prompt_tokens: int,
                    completion_tokens: int) -> Booking:
        """A cache hit or a coalesced answer: costs 0, saves its tier's price (see Dispatcher.book_cached)."""
        fallback_tier = self.target(p.request.model) or self.names[0]
        return self.dispatch.book_cached(p.request_id, p.request.model, tier, fallback_tier, kind, prompt_tokens,
                                         completion_tokens)

    async def warm_up(self) -> None:
        """Each tier's warm-up (a local one runs one token through its engine, see LocalBackend.warm_up)."""
        for t in self.tiers.values():
            await t.backend.warm_up()

    async def close(self) -> None:
        for t in self.tiers.values():
            await t.backend.close()
        self.ledger.close()
        if self.cache is not None:
            await self.cache.drain()
            self.cache.close()
