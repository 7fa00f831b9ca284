"""Admission by deadline: a prompt is taken only when its prefill can end within its tier's timeout.

A local tier answers its first token after the prefill; its `timeout_s` is how long the gateway waits for that
token. So on arrival a prompt of n tokens is estimated to get its first token after

    (n + work ahead) / (measured prefill rate - inflow)

- the prefill rate: the engine's, measured on its own recent steps under load (thrifty.engine.prefill_rate);
- the work ahead: what every admitted prompt of that tier still has to prefill (the engine's count once it holds
  the request, the prompt's length before), each counted up to n: the scheduler prefills the shortest remaining
  first and shares a step's budget among prompts, so a longer prompt delays a short one by at most n tokens;
- the inflow: prompt tokens admitted per second over the last INFLOW_WINDOW_S, each counted up to n: for the same
  reason, prompts that arrive while this one waits go ahead of it, and under a steady stream of short prompts a
  long one gets only the rate they leave over.

Then, with HEADROOM for the rate's noise:
- n alone cannot make it (n / rate > HEADROOM x timeout): 400 naming the largest prompt that would;
- it could alone, but not behind the work ahead and the inflow: 429 with Retry-After;
- else it is admitted, and the estimate travels back in the `x-thrifty-prefill-estimate` header (seconds).

A tier whose rate is not known yet (no probe, no prefill seen), and remote tiers, admit by queue length only.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from thrifty.server.errors import PromptOverDeadlineError, ServerBusyError

ESTIMATE_HEADER = "x-thrifty-prefill-estimate"
HEADROOM = 0.6             # admit what the estimate puts within this share of the timeout (soaks saw
                           # estimates off by up to 1.5x under bursts)
INFLOW_WINDOW_S = 60.0
MIN_SPARE = 0.05           # a tier whose inflow leaves less than this share of its rate takes only short prompts


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
    clock: Callable[[], float] = time.monotonic
    headroom: float = HEADROOM
    arrivals: deque[tuple[float, str, int]] = field(default_factory=deque)   # (time, tier, tokens) admitted

    def inflow(self, tier: str, tokens: int, now: float) -> float:
        """Prompt tokens per second admitted to `tier` lately, each counted up to `tokens`."""
        while self.arrivals and self.arrivals[0][0] < now - INFLOW_WINDOW_S:
            self.arrivals.popleft()
        return sum(min(n, tokens) for _, t, n in self.arrivals if t == tier) / INFLOW_WINDOW_S

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
        budget = self.headroom * timeout
        limit = int(rate * budget)
        if tokens > limit:
            raise PromptOverDeadlineError(
                f"the prompt has {tokens} tokens; this server prefills about {rate:.0f} tokens/s, so the largest "
                f"prompt it can answer within its {timeout:g} s timeout is {limit} tokens", "shorten the prompt to "
                f"at most {limit} tokens, or send it to a tier with a longer timeout", param=param)
        now = self.clock()
        spare = rate - self.inflow(tier, tokens, now)
        if spare < MIN_SPARE * rate:
            raise ServerBusyError(f"prompts shorter than this one ({tokens} tokens) arrive as fast as this server "
                                  f"prefills ({rate:.0f} tokens/s); it would not start within its {timeout:g} s "
                                  "timeout", math.ceil(INFLOW_WINDOW_S / 4))
        estimate = (tokens + self.work_ahead(tier, tokens, snapshot)) / spare
        if estimate > budget:
            wait = min(math.ceil(estimate - budget), int(INFLOW_WINDOW_S))
            raise ServerBusyError(f"the prompts queued ahead would delay this one's first token to about "
                                  f"{estimate:.0f} s, past the {budget:g} s this server allows within its {timeout:g} s timeout",
                                  max(wait, 1))
        self.arrivals.append((now, tier, tokens))
        self.reserved[request_id] = Reservation(tier, tokens)
        return estimate

    def started(self, request_id: str) -> None:
        r = self.reserved.get(request_id)
        if r is not None:
            r.started = True

    def release(self, request_id: str) -> None:
        self.reserved.pop(request_id, None)
