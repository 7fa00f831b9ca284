"""Admission by deadline: a prompt is taken only when its prefill can end within its tier's timeout.

A local tier answers its first token after the prefill; its `timeout_s` is how long the gateway waits for that
token. So on arrival a prompt of n tokens is estimated to finish its prefill in

    (n + work ahead) / the engine's measured prefill rate (thrifty.engine.prefill_rate)

where the work ahead is what every admitted prompt of that tier still has to prefill (the engine's count once it
holds the request, the prompt's length before), each counted up to n: the scheduler prefills the shortest
remaining first and shares a step's budget among prompts, so a longer prompt delays a short one by at most the
short one's own length. Then

- n alone cannot make it (n / rate > timeout): 400 naming the largest prompt that would (rate x timeout);
- it could alone, but not behind the work ahead: 429 with Retry-After, the seconds until enough of it is done;
- else it is admitted, and the estimate travels back in the `x-thrifty-prefill-estimate` header (seconds).

A tier whose rate is not known yet (no probe, no prefill seen), and remote tiers, admit by queue length only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from thrifty.server.errors import PromptOverDeadlineError, ServerBusyError

ESTIMATE_HEADER = "x-thrifty-prefill-estimate"


@dataclass(slots=True)
class Reservation:
    tier: str
    tokens: int
    started: bool = False            # its first token came: its prefill is no longer ahead of anyone


@dataclass(slots=True)
class DeadlineAdmission:
    # tier name -> (its EngineSnapshot, its timeout in s), or None for a tier not judged (remote, unknown)
    tier_state: Callable[[str], tuple[Any, float] | None]
    reserved: dict[str, Reservation] = field(default_factory=dict)

    def work_ahead(self, tier: str, tokens: int, snapshot: Any) -> int:
        left = snapshot.prefilling
        return sum(min(left.get(rid, r.tokens), tokens) for rid, r in self.reserved.items()
                   if r.tier == tier and not r.started)

    def admit(self, request_id: str, tier: str, tokens: int, param: str = "prompt") -> float | None:
        """The estimated seconds to the first token (None: not judged); raises PromptOverDeadlineError (400) or
        ServerBusyError (429). Reserves the prompt's work until started() or release()."""
        state = self.tier_state(tier)
        rate = state[0].prefill_tokens_per_s if state is not None else None
        if state is None or not rate:
            return None
        snapshot, timeout = state
        limit = int(rate * timeout)
        if tokens > limit:
            raise PromptOverDeadlineError(
                f"the prompt has {tokens} tokens; this server prefills about {rate:.0f} tokens/s, so the largest "
                f"prompt it can answer within its {timeout:g} s timeout is {limit} tokens", "shorten the prompt to "
                f"at most {limit} tokens, or send it to a tier with a longer timeout", param=param)
        estimate = (tokens + self.work_ahead(tier, tokens, snapshot)) / rate
        if estimate > timeout:
            wait = math.ceil(estimate - timeout)
            raise ServerBusyError(f"the prompts queued ahead would delay this one's first token to about "
                                  f"{estimate:.0f} s, past this server's {timeout:g} s timeout", wait)
        self.reserved[request_id] = Reservation(tier, tokens)
        return estimate

    def started(self, request_id: str) -> None:
        r = self.reserved.get(request_id)
        if r is not None:
            r.started = True

    def release(self, request_id: str) -> None:
        self.reserved.pop(request_id, None)
