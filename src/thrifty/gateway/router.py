"""Routing: which tier answers a `model: "auto"` request, and (cascade) whether an answer must go up a tier.

Tiers are ordered cheapest first. Three strategies, one threshold each:

- `fixed`: always one tier (router.tier, default the cheapest).
- `classifier`: a light model (thrifty.gateway.difficulty) estimates P(the cheapest tier fails) from MiniLM
  embeddings and cheap features; above the threshold the request goes to the next tier up.
- `cascade`: answer on the cheapest tier, then check the answer (the code parses and the prompt's own
  examples pass in a sandbox, and/or the mean token logprob); a failed check escalates one tier up.

The gateway calls `choose` once, then after each answer `escalate` (only the cascade ever says yes). Both may
take milliseconds to seconds (an embedding, a sandboxed run): call them off the event loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from thrifty.config import RouterSettings


@dataclass(slots=True)
class RouteRequest:
    """What a router looks at: the text of the request (the last user message, or the prompt)."""
    text: str
    messages: list[dict] | None = None       # chat: all messages as {"role", "content"}


@dataclass(slots=True)
class Route:
    tier: str
    reason: str                               # for the x-thrifty-route header, e.g. "classifier p_hard=0.31<0.50"


@dataclass(slots=True)
class Answer:
    """A finished answer from one tier, as the cascade checks it."""
    text: str
    token_logprobs: list[float] = field(default_factory=list)   # of the sampled tokens; empty if unknown
    finish_reason: str | None = "stop"

    def mean_logprob(self) -> float | None:
        finite = [lp for lp in self.token_logprobs if math.isfinite(lp)]
        return sum(finite) / len(finite) if finite else None


class Router(Protocol):
    strategy: str

    def choose(self, request: RouteRequest) -> Route: ...

    def escalate(self, request: RouteRequest, answer: Answer, tier: str) -> tuple[bool, str]:
        """(True, reason) when `answer` from `tier` is not good enough and the next tier should answer."""
        ...


@dataclass(slots=True)
class FixedRouter:
    tier: str
    strategy: str = "fixed"

    def choose(self, request: RouteRequest) -> Route:
        return Route(self.tier, "fixed")

    def escalate(self, request: RouteRequest, answer: Answer, tier: str) -> tuple[bool, str]:
        return False, "fixed"


def next_tier(tiers: list[str], tier: str) -> str | None:
    i = tiers.index(tier)
    return tiers[i + 1] if i + 1 < len(tiers) else None


def build_router(settings: RouterSettings | None, tiers: list[str]) -> Router:
    """The router the settings ask for over `tiers` (cheapest first). Raises ConfigError on bad settings
    (an unknown tier, a missing classifier file) before anything is served."""
    from thrifty.config import ConfigError

    settings = settings or RouterSettings()
    if not tiers:
        raise ConfigError("no tiers to route to", "add model_list entries")
    if settings.strategy == "fixed":
        tier = settings.tier or tiers[0]
        if tier not in tiers:
            raise ConfigError(f"router.tier {tier!r} is not a tier; tiers: {', '.join(tiers)}")
        return FixedRouter(tier)
    if len(tiers) < 2:
        raise ConfigError(f"router.strategy {settings.strategy!r} needs at least two tiers, got {len(tiers)}",
                          "add a larger tier to model_list, or use strategy: fixed")
    if settings.strategy == "classifier":
        from thrifty.gateway.classifier_router import ClassifierRouter

        return ClassifierRouter.from_settings(settings, tiers)
    from thrifty.gateway.cascade import CascadeRouter

    return CascadeRouter.from_settings(settings, tiers)
