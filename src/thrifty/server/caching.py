"""The response cache and the coalescer in front of the engine, for the server's two generation routes.

For each request `ServerCache.plan` decides whether the cache may take part (it is on, the request is
deterministic or the config allows otherwise, no logprobs asked for) and builds its keys; `source` then
answers from the cache (exact, then semantic), or joins an identical request already in flight, or
starts the generation (which stores its answer when it finishes). It returns the RequestOutputs to
format and the response headers:

    x-thrifty-cache: hit | semantic-hit | miss | coalesced
    x-thrifty-cache-similarity: 0.9312            (semantic hits; 1.0 on exact hits)

A cached answer is replayed as RequestOutputs in word-sized pieces, so `stream=true` gets a proper SSE
stream. Its usage says what happened: prompt_tokens_details.cached_tokens == prompt_tokens (nothing was
computed), completion_tokens is the stored answer's length; the engine's token counters do not move.

The cache sits in front of routing: a hit never asks the router. Keys use the model the request names
(a tier and its aliases share entries; `auto` has its own), and entries remember the tier that produced
them, so the cost ledger can book a hit (or a coalesced request) as costing 0 and saving what it would
have cost on that tier.
"""
from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from thrifty.engine.engine import RequestOutput, Usage
from thrifty.gateway.cache import Controls, Hit, ResponseCache, build_request, tenant_id
from thrifty.gateway.cache.keys import CacheRequest
from thrifty.gateway.coalesce import Coalescer

if TYPE_CHECKING:
    from fastapi import Request

    from thrifty.config import CacheSettings
    from thrifty.server import schemas as s
    from thrifty.server.serving import EngineClient, Prepared

HEADER = "x-thrifty-cache"
SIMILARITY_HEADER = "x-thrifty-cache-similarity"
_PIECE = re.compile(r"\s*\S+\s*|\s+")


def _model_identity(name: str, names: set[str]) -> str:
    """The served name, the model's other names, and for a file or folder its size and mtime: new weights
    under an old name do not answer from the old weights' entries."""
    import os

    parts = [name]
    for n in sorted(names - {name}):
        parts.append(n)
        try:
            st = os.stat(n)
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            pass
    return "|".join(parts)


class ServerCache:
    def __init__(self, client: EngineClient, cache: ResponseCache | None, settings: CacheSettings) -> None:
        self.client = client
        self.cache = cache
        self.settings = settings
        self.coalescer = Coalescer()
        self._model_ids: dict[str | None, str] = {}

    def model_id(self, target: str | None) -> str:
        """The cache's model identity of a pinned tier (its name and aliases), or of `auto` (every tier
        and the routing strategy: another router may answer differently)."""
        if target not in self._model_ids:
            gw = self.client.gateway
            if target is None:
                parts = ["auto", gw.router.strategy] + [self.model_id(t) for t in gw.names]
                self._model_ids[None] = "||".join(parts)
            else:
                tier = gw.tiers[target]
                self._model_ids[target] = _model_identity(target, {target, *tier.aliases})
        return self._model_ids[target]

    @property
    def enabled(self) -> bool:
        return self.cache is not None

    # ---- planning ----------------------------------------------------------------------------------
    def plan(self, p: Prepared, body: s.ChatCompletionRequest | s.CompletionRequest, request: Request,
             chat: bool) -> CacheRequest | None:
        if self.cache is None or p.top_logprobs is not None:
            return None
        if not (p.params.temperature == 0 or p.params.seed is not None or self.settings.cache_nondeterministic):
            return None
        opts = body.cache.model_dump(by_alias=True) if body.cache is not None else None
        controls = Controls.parse(opts, request.headers.get("cache-control"))
        auth = request.headers.get("authorization", "")
        tenant = tenant_id(auth.partition(" ")[2].strip() or None, request.headers.get("x-thrifty-tenant"))
        text, context = self._semantic_parts(body, chat)
        if text is not None and len(text) > self.settings.semantic_max_chars:
            text = None
        # no local tokenizer (a remote tier): the request's own bytes are its exact key
        ids = p.prompt_ids or list(json.dumps(p.messages if chat else p.prompt, sort_keys=True).encode())
        return build_request(tenant=tenant, namespace=self.settings.namespace, model=self.model_id(p.target),
                             endpoint="chat" if chat else "completions", prompt_ids=ids, context=context,
                             text=text, params=p.params, controls=controls, default_ttl_s=self.settings.ttl_s)

    @staticmethod
    def _semantic_parts(body: Any, chat: bool) -> tuple[str | None, Any]:
        """(text the embedder sees, everything else that must match exactly)."""
        if chat:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(), "name": m.name}
                    for m in body.messages]
            if msgs[-1]["role"] != "user":
                return None, msgs
            return msgs[-1]["content"], msgs[:-1] + [{"role": "user", "name": msgs[-1]["name"]}]
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt, "prompt"
        return None, list(prompt)

    # ---- answering ---------------------------------------------------------------------------------
    async def source(self, p: Prepared, plan: CacheRequest | None) -> tuple[AsyncIterator[RequestOutput] | None,
                                                                            dict[str, str]]:
        """(outputs to format, or None for the plain engine path; response headers)."""
        metrics = self.client.metrics
        if self.cache is None:
            return None, {}
        if plan is None:
            metrics.cache_requests.labels("bypass").inc()
            return None, {HEADER: "miss"}
        if plan.read:
            start = time.perf_counter()
            hit = await self.cache.lookup(plan)
            metrics.cache_lookup.observe(time.perf_counter() - start)
            if hit is not None:
                r = hit.entry.response
                self.client.gateway.book_cached(p, r.get("tier"), hit.kind, self._prompt_tokens(p, r),
                                                int(r.get("completion_tokens", 0)))
                return self._replay(p, hit), self._hit_headers(hit)
        if self.settings.coalesce and plan.read:
            # stored as the last output passes (not in on_finish): the leader's client may leave as soon as
            # it has the last output, and that cancels a flight whose tier is still closing its connection
            outputs, leader = self.coalescer.join(plan.key, lambda: self._store_after(p, plan))
            if leader:
                metrics.cache_requests.labels("miss").inc()
                return outputs, {HEADER: "miss"}
            metrics.cache_requests.labels("coalesced").inc()
            return self._as_follower(p, outputs), {HEADER: "coalesced"}
        metrics.cache_requests.labels("miss").inc()
        return self._store_after(p, plan), {HEADER: "miss"}

    def _hit_headers(self, hit: Hit) -> dict[str, str]:
        m = self.client.metrics
        m.cache_requests.labels(hit.kind).inc()
        m.cache_served_tokens.labels(hit.kind).inc(int(hit.entry.response.get("completion_tokens", 0)))
        if hit.kind == "semantic-hit":
            m.cache_similarity.observe(hit.similarity)
        return {HEADER: hit.kind, SIMILARITY_HEADER: f"{hit.similarity:.4f}"}

    async def _finished(self, plan: CacheRequest, out: RequestOutput) -> None:
        if self.cache is not None and out.finished and out.finish_reason in ("stop", "length"):
            self.cache.save_in_background(plan, {
                "text": out.text, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                "prompt_tokens": out.usage.prompt_tokens, "completion_tokens": out.usage.completion_tokens,
                "tier": getattr(out, "tier", None)})

    async def _store_after(self, p: Prepared, plan: CacheRequest) -> AsyncIterator[RequestOutput]:
        async for out in self.client.generate(p):
            if out.finished:  # stored before it is handed on: a consumer may stop right after the last output
                await self._finished(plan, out)
            yield out

    async def _as_follower(self, p: Prepared, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """A coalesced request computed nothing itself: its usage says all of its prompt was cached, and
        the ledger books it as free (saving what the leader's tier charged)."""
        served = 0
        async for out in outputs:
            u = out.usage
            usage = Usage(u.prompt_tokens, u.prompt_tokens, u.completion_tokens, None, None)
            served = u.completion_tokens
            if out.finished:
                self.client.gateway.book_cached(p, getattr(out, "tier", None), "coalesced", u.prompt_tokens,
                                                u.completion_tokens)
            yield RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, out.text, out.token_ids,
                                out.delta_text, out.delta_token_ids, out.finished, out.finish_reason,
                                out.stop_reason, out.logprobs, usage)
        self.client.metrics.cache_served_tokens.labels("coalesced").inc(served)

    @staticmethod
    def _prompt_tokens(p: Prepared, r: dict) -> int:
        return len(p.prompt_ids) if p.prompt_ids else int(r.get("prompt_tokens", 0))

    async def _replay(self, p: Prepared, hit: Hit) -> AsyncIterator[RequestOutput]:
        r = hit.entry.response
        text = str(r.get("text", ""))
        n_prompt = self._prompt_tokens(p, r)
        usage = Usage(n_prompt, n_prompt, int(r.get("completion_tokens", 0)), None, None)
        pieces = _PIECE.findall(text) or [""]
        so_far = ""
        for i, piece in enumerate(pieces):
            so_far += piece
            last = i == len(pieces) - 1
            yield RequestOutput(p.request_id, None, p.prompt_ids, so_far, [], piece, [], last,
                                r.get("finish_reason", "stop") if last else None,
                                r.get("stop_reason") if last else None, [], usage)
