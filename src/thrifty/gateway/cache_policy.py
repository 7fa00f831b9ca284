"""Which requests the response cache takes part in, their keys, and answers replayed from it.

`plan` decides whether the cache may take part (it is on, the request is deterministic or the config
allows otherwise, no logprobs asked for) and builds its keys; `replay` turns a stored answer into
outputs in word-sized pieces, so a streamed request gets a proper stream; `store_after` passes a
generation on and stores its answer as the last output passes.

A replayed (or coalesced) answer's usage says what happened: cached_tokens == prompt_tokens (nothing was
computed), completion_tokens is the stored answer's length. Keys use the model the request names (a tier
and its aliases share entries; `auto` has its own), and entries remember the tier that produced them, so
the ledger can book a hit as costing 0 and saving what it would have cost on that tier.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, AsyncIterator

from thrifty.config import CacheSettings
from thrifty.engine.engine import RequestOutput, Usage
from thrifty.gateway.cache import Hit, ResponseCache, build_request, tenant_id
from thrifty.gateway.cache.keys import CacheRequest, chat_parts
from thrifty.gateway.request import BackendRequest, GatewayOutput

_PIECE = re.compile(r"\s*\S+\s*|\s+")


def model_identity(name: str, names: set[str]) -> str:
    """The served name, the model's other names, and for a file or folder its size and mtime: new weights
    under an old name do not answer from the old weights' entries."""
    parts = [name]
    for n in sorted(names - {name}):
        parts.append(n)
        try:
            st = os.stat(n)
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            pass
    return "|".join(parts)


def semantic_parts(p: BackendRequest) -> tuple[str | None, Any]:
    """(text the embedder sees, everything else that must match exactly)."""
    if p.chat:
        return chat_parts(p.messages or [])
    prompt = p.prompt
    if isinstance(prompt, str):
        return prompt, "prompt"
    return None, list(prompt or [])


class CachePolicy:
    def __init__(self, cache: ResponseCache | None, settings: CacheSettings) -> None:
        self.cache, self.settings = cache, settings

    def plan(self, p: BackendRequest, model_id: str) -> CacheRequest | None:
        """The request's cache keys, or None when the cache must not take part."""
        if self.cache is None or p.params.logprobs is not None:
            return None
        if not (p.params.temperature == 0 or p.params.seed is not None or self.settings.cache_nondeterministic):
            return None
        r = p.request
        text, context = semantic_parts(p)
        if text is not None and len(text) > self.settings.semantic_max_chars:
            text = None
        # no local tokenizer (a remote tier): the request's own bytes are its exact key
        ids = p.prompt_ids or list(json.dumps(r.messages if r.chat else r.prompt, sort_keys=True).encode())
        return build_request(tenant=tenant_id(r.api_key, r.tenant), namespace=self.settings.namespace,
                             model=model_id, endpoint="chat" if r.chat else "completions", prompt_ids=ids,
                             context=context, text=text, params=p.params, controls=r.cache,
                             default_ttl_s=self.settings.ttl_s)

    async def store_after(self, outputs: AsyncIterator[GatewayOutput], plan: CacheRequest
                          ) -> AsyncIterator[GatewayOutput]:
        """`outputs` passed on; the answer is stored before the last one is handed on (a consumer may stop
        right after it)."""
        async for out in outputs:
            if out.finished:
                self._store(plan, out)
            yield out

    def _store(self, plan: CacheRequest, out: GatewayOutput) -> None:
        if self.cache is not None and out.finish_reason in ("stop", "length"):
            self.cache.save_in_background(plan, {
                "text": out.text, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                "prompt_tokens": out.usage.prompt_tokens, "completion_tokens": out.usage.completion_tokens,
                "tier": out.tier or None})


def prompt_tokens(p: BackendRequest, stored: dict) -> int:
    return len(p.prompt_ids) if p.prompt_ids else int(stored.get("prompt_tokens", 0))


async def replay(p: BackendRequest, hit: Hit, tier: str, route: str) -> AsyncIterator[GatewayOutput]:
    """A stored answer as outputs, one word-sized piece each; every prompt token counts as cached."""
    r = hit.entry.response
    text = str(r.get("text", ""))
    n_prompt = prompt_tokens(p, r)
    usage = Usage(n_prompt, n_prompt, int(r.get("completion_tokens", 0)), None, None)
    pieces = _PIECE.findall(text) or [""]
    so_far = ""
    for i, piece in enumerate(pieces):
        so_far += piece
        last = i == len(pieces) - 1
        yield GatewayOutput(p.request_id, None, p.prompt_ids, so_far, [], piece, [], last,
                            r.get("finish_reason", "stop") if last else None, r.get("stop_reason") if last else None,
                            [], usage, tier=tier, route=route, cache=hit.kind, cost=0.0 if last else None)

