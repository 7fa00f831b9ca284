"""What a request is, for the caches: its exact key, its semantic scope and text, and its controls.

- exact key: SHA-256 over the tenant, namespace, model, endpoint, the prompt's token ids (all messages
  rendered through the chat template, system prompt included) and every sampling parameter (they all
  change the output);
- scope: the same, except that the last user message is left out: two requests may share an answer
  semantically only when everything but that message is equal. It is the store's hard filter;
- text: the last user message (chat) or the prompt (completions), what the embedder and the guard see.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Controls:
    """Per-request controls, LiteLLM style: body `cache: {no-cache, no-store, ttl, namespace, s-maxage}`
    and the `Cache-Control` header (no-cache, no-store, max-age)."""
    no_cache: bool = False            # do not answer from the cache (still store, unless no_store)
    no_store: bool = False            # do not store this answer
    ttl_s: float | None = None        # this entry's TTL (default: the config's)
    max_age_s: float | None = None    # accept only entries younger than this
    namespace: str | None = None

    @classmethod
    def parse(cls, body: dict[str, Any] | None, cache_control: str | None) -> Controls:
        c = cls()
        body = body or {}
        c.no_cache = bool(body.get("no-cache") or body.get("no_cache"))
        c.no_store = bool(body.get("no-store") or body.get("no_store"))
        ttl = body.get("ttl")
        c.ttl_s = float(ttl) if ttl is not None else None
        age = body.get("s-maxage", body.get("s_maxage"))
        c.max_age_s = float(age) if age is not None else None
        ns = body.get("namespace")
        c.namespace = str(ns) if ns else None
        for part in (cache_control or "").lower().split(","):
            name, _, value = part.strip().partition("=")
            if name == "no-cache":
                c.no_cache = True
            elif name == "no-store":
                c.no_store = True
            elif name in ("max-age", "s-maxage") and value.strip().isdigit():
                c.max_age_s = float(value.strip())
        return c


@dataclass(slots=True)
class CacheRequest:
    key: str
    scope: str
    namespace: str
    text: str | None                  # None: exact cache only
    read: bool
    write: bool
    ttl_s: float | None
    max_age_s: float | None


def chat_parts(messages: list[dict[str, Any]]) -> tuple[str | None, Any]:
    """A chat's (last user message: the text the embedder sees, everything before it: the context that
    must match exactly). No text when the chat does not end with a user message."""
    msgs = [{"role": m["role"], "content": m["content"], "name": m.get("name")} for m in messages]
    if not msgs or msgs[-1]["role"] != "user":
        return None, msgs
    return msgs[-1]["content"], msgs[:-1] + [{"role": "user", "name": msgs[-1]["name"]}]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def params_dict(params: Any) -> dict[str, Any]:
    """A SamplingParams (or any dataclass / mapping) as plain JSON-able data."""
    if dataclasses.is_dataclass(params):
        return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    return dict(params)


def build_request(*, tenant: str, namespace: str, model: str, endpoint: str, prompt_ids: list[int],
                  context: Any, text: str | None, params: Any, controls: Controls, default_ttl_s: float | None,
                  ) -> CacheRequest:
    p = params_dict(params)
    ns = controls.namespace or namespace
    base = {"tenant": tenant, "namespace": ns, "model": model, "endpoint": endpoint, "params": p}
    key = _digest({**base, "prompt_ids": prompt_ids})
    scope = _digest({**base, "context": context})
    return CacheRequest(key=key, scope=scope, namespace=ns, text=text, read=not controls.no_cache,
                        write=not controls.no_store,
                        ttl_s=controls.ttl_s if controls.ttl_s is not None else default_ttl_s,
                        max_age_s=controls.max_age_s)


def tenant_id(api_key: str | None, tenant_header: str | None) -> str:
    """Who owns an entry: the bearer token (hashed) and the tenant header together. Two API keys, or two
    tenants behind one key, never share an entry."""
    key_part = hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else "-"
    return f"{key_part}/{tenant_header or '-'}"
