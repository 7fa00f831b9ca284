"""What goes into the gateway and what comes out of it.

A `GatewayRequest` is one chat or completion request in the gateway's words (no HTTP in it): the model
name the client sent (`auto`, a tier, or a local tier's model), the messages or prompt, SamplingParams,
and who asks (for the caches' tenant scope). A backend checks it and makes it a `BackendRequest` (prompt
ids in its vocabulary, final params). Out come `GatewayOutput`s: the engine's RequestOutput tagged with
the tier that answered, the route, the cache outcome and, on the last one, the cost.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from thrifty.engine.engine import RequestOutput
from thrifty.engine.sampling import SamplingParams
from thrifty.gateway.cache.keys import Controls


@dataclass(slots=True, frozen=True)
class Limits:
    """Per-request limits a backend checks with the prompt's token count in hand."""
    max_prompt_tokens: int | None = None      # None: the model's context
    max_output_tokens: int = 4096             # the largest max_tokens a request may ask for


@dataclass(slots=True)
class GatewayRequest:
    request_id: str
    model: str                                # as sent: `auto`, a tier's name or a local tier's model
    chat: bool = True
    messages: list[dict] | None = None        # chat: {"role", "content"[, "name"]}
    prompt: str | list[int] | None = None     # completions: text or token ids
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_given: bool = True             # False: params.max_tokens is a default the context may lower
    limits: Limits = Limits()
    forward: dict[str, Any] = field(default_factory=dict)   # the client's OpenAI fields, for remote tiers
    api_key: str | None = None                # who asks: the caches never share across keys or tenants
    tenant: str | None = None
    key_id: str | None = None                 # the virtual API key's id: the ledger books its spend under it
    cache: Controls = field(default_factory=Controls)


@dataclass(slots=True)
class BackendRequest:
    """A request one backend checked: its prompt ids (empty where the backend has no tokenizer) and params."""
    request: GatewayRequest
    prompt_ids: list[int]
    params: SamplingParams
    checked_by: str = ""                      # the backend's name: another backend checks for itself
    valid: Any = None                         # that backend's own record of the check (the engine's ValidRequest)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def chat(self) -> bool:
        return self.request.chat

    @property
    def messages(self) -> list[dict] | None:
        return self.request.messages

    @property
    def prompt(self) -> str | list[int] | None:
        return self.request.prompt

    @property
    def forward(self) -> dict[str, Any]:
        return self.request.forward


@dataclass(slots=True)
class GatewayOutput(RequestOutput):
    tier: str = ""
    route: str = ""                           # "tier; reason" (x-thrifty-route)
    cache: str | None = None                  # hit | semantic-hit | miss | coalesced | bypass; None: no cache
    cost: float | None = None                 # USD, on the final output


@dataclass(slots=True)
class Reply:
    """The gateway's answer before its first output: what is known up front, and the outputs to come."""
    outputs: AsyncIterator[GatewayOutput]
    cache: str | None = None                  # as on the outputs
    similarity: float | None = None           # the cache hit's (1.0 exact)
    lookup_s: float | None = None             # time spent in the cache look-up
    route: str | None = None                  # known before the first output (a cache hit, a single tier)
    cost: float | None = None                 # known up front for a cache hit (0)
    tier: str | None = None                   # known up front for a cache hit


_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(RequestOutput))
_ALL_FIELDS = tuple(f.name for f in dataclasses.fields(GatewayOutput))


def tag(out: RequestOutput, **tags: Any) -> GatewayOutput:
    """`out` as a new GatewayOutput with `tags` set (one made from a GatewayOutput keeps its other tags)."""
    values = {name: getattr(out, name) for name in (_ALL_FIELDS if isinstance(out, GatewayOutput) else _OUTPUT_FIELDS)}
    values.update(tags)
    return GatewayOutput(**values)
