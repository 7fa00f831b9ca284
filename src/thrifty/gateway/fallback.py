"""Fallback: retries with exponential backoff, per-tier timeouts, cooldown of failing tiers.

`Fallback.run(tiers, first, attempt)` tries `attempt(tier)` on `first`, then on the tiers above it
(cheapest-first order), then wraps around to the cheaper ones. Each tier gets `retries` more tries after
the first, waiting backoff_s, 2 x backoff_s, ... in between; each try must finish within the tier's
timeout_s. A tier that used up its tries cools down for cooldown_s: while it cools it goes to the end of
the order, so it is tried only when every other tier failed too.

What "finish" means is the caller's choice: the gateway's attempt ends at a tier's first output (for a
streamed answer, the moment before the first byte goes to the client), or at its last (an answer the
cascade buffers to check). Fallback is only possible before the first byte went to the client: once
an answer is streaming, an error ends it.

A request the backend calls invalid (InvalidRequestError) is not retried: no tier would take it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from thrifty.config import RouterSettings
from thrifty.errors import InvalidRequestError, ThriftyError
from thrifty.gateway.backends import BackendError, TierTimeoutError

log = logging.getLogger("thrifty.gateway")
T = TypeVar("T")


class AllTiersFailedError(BackendError):
    """Every tier in the fallback order failed."""

    def __init__(self, failures: list[Failure]) -> None:
        tiers = ", ".join(dict.fromkeys(f.tier for f in failures))
        ThriftyError.__init__(self, f"every tier failed ({tiers}); last error: {failures[-1].error}",
                              "see the server log for each tier's failures")
        self.tier, self.failures = tiers, failures


@dataclass(slots=True)
class Failure:
    tier: str
    error: str


class Fallback:
    def __init__(self, settings: RouterSettings, timeouts: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self.timeouts = timeouts or {}
        self.clock, self.sleep = clock, sleep
        self._cool_until: dict[str, float] = {}

    def cooling(self, tier: str) -> bool:
        until = self._cool_until.get(tier)
        return until is not None and self.clock() < until

    def order(self, tiers: list[str], first: str) -> list[str]:
        """`first`, the tiers above it, then the cheaper ones; cooling tiers last."""
        i = tiers.index(first)
        ring = tiers[i:] + tiers[:i] if self.settings.fallback else [first]
        return [t for t in ring if not self.cooling(t)] + [t for t in ring if self.cooling(t)]

    async def run(self, tiers: list[str], first: str,
                  attempt: Callable[[str], Awaitable[T]]) -> tuple[str, T, list[Failure]]:
        """(the tier that answered, its result, the failures before it). Raises the tier's own error when
        only one tier was tried, AllTiersFailedError when several were."""
        failures: list[Failure] = []
        last: BaseException | None = None
        order = self.order(tiers, first)
        for tier in order:
            timeout = self.timeouts.get(tier)
            for n in range(self.settings.retries + 1):
                if n:
                    await self.sleep(self.settings.backoff_s * 2 ** (n - 1))
                try:
                    async with asyncio.timeout(timeout):
                        result = await attempt(tier)
                except InvalidRequestError:
                    raise
                except TimeoutError:
                    last = TierTimeoutError(tier, f"no answer within its timeout of {timeout:g} s")
                except Exception as e:  # noqa: BLE001 -- a tier's failure, whatever it is, is a reason to fall back
                    last = e
                else:
                    self._cool_until.pop(tier, None)
                    return tier, result, failures
                failures.append(Failure(tier, _describe(last, tier)))
                log.warning("tier %s failed (try %d of %d): %s", tier, n + 1, self.settings.retries + 1,
                            failures[-1].error)
            self._cool_until[tier] = self.clock() + self.settings.cooldown_s
        assert last is not None
        if len(order) == 1:
            raise last
        raise AllTiersFailedError(failures)


def _describe(e: BaseException, tier: str) -> str:
    if isinstance(e, BackendError):
        return e.message
    return f"tier '{tier}' failed: {type(e).__name__}: {e}"
