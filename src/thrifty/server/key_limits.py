"""Per-key limits: requests and tokens per minute (sliding 60-second windows, in this process) and the USD budget
per day or month (the cost ledger's spend for the key since the period began). A refused request changes no
state: it is not counted against the window, and it books nothing."""
from __future__ import annotations

import calendar
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from thrifty.errors import ThriftyError
from thrifty.server.api_keys import ApiKey

WINDOW_S = 60.0


class KeyRateLimitError(ThriftyError):
    """A key's requests or tokens per minute are used up (429, Retry-After)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class BudgetExceededError(KeyRateLimitError):
    """A key's budget for the day or month is spent (402, Retry-After: when the next period begins)."""


@dataclass(slots=True)
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)

    def trim(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.tokens.popleft()


class KeyLimits:
    def __init__(self, spend: Callable[[str, float], float], clock: Callable[[], float] = time.time) -> None:
        self.spend, self.clock = spend, clock      # spend(key_id, since_unix_time) -> USD
        self._windows: dict[str, _Window] = {}

    def admit(self, key: ApiKey) -> None:
        """Count one request of `key`, or raise KeyRateLimitError / BudgetExceededError."""
        now = self.clock()
        w = self._windows.setdefault(key.key_id, _Window())
        w.trim(now)
        if key.rpm is not None and len(w.requests) >= key.rpm:
            raise KeyRateLimitError(f"key {key.key_id} has used its {key.rpm} requests per minute",
                                    _wait(w.requests[0], now))
        used = sum(n for _, n in w.tokens)
        if key.tpm is not None and used >= key.tpm:
            raise KeyRateLimitError(f"key {key.key_id} has used its {key.tpm} tokens per minute ({used})",
                                    _wait(w.tokens[0][0], now))
        if key.budget_usd is not None:
            start, end = period_bounds(key.period, now)
            spent = self.spend(key.key_id, start)
            if spent >= key.budget_usd:
                raise BudgetExceededError(f"key {key.key_id} has spent ${spent:.4f} of its ${key.budget_usd:g} "
                                          f"budget this {key.period}", max(1, int(end - now) + 1))
        w.requests.append(now)

    def record_tokens(self, key_id: str, tokens: int) -> None:
        """An answer's prompt + completion tokens, for the tokens-per-minute window."""
        self._windows.setdefault(key_id, _Window()).tokens.append((self.clock(), tokens))


def _wait(oldest: float, now: float) -> int:
    return max(1, int(oldest + WINDOW_S - now) + 1)


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """[start, end) of the UTC day or month holding `now`, as Unix times."""
    t = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return start, start + 86400
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return start, calendar.timegm((year, month, 1, 0, 0, 0))
