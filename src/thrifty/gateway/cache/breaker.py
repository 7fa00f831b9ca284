"""A circuit breaker for the cache store: after `failures` errors in a row, stop calling it for
`cooldown_s`; then let one call through (half-open) and close again when it succeeds."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(slots=True)
class CircuitBreaker:
    failures: int = 3
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[bool, str], None] | None = None   # (open?, reason) at every open / close
    _count: int = 0
    _open_until: float = 0.0
    _trial: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_open(self) -> bool:
        return self._count >= self.failures

    def allow(self) -> bool:
        """May the caller use the store now? While open: no, except one trial call after the cooldown."""
        with self._lock:
            if self._count < self.failures:
                return True
            if self.clock() >= self._open_until and not self._trial:
                self._trial = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            was_open = self._count >= self.failures
            self._count, self._trial = 0, False
        if was_open and self.on_change:
            self.on_change(False, "the store answers again")

    def failure(self, reason: str) -> None:
        with self._lock:
            was_open = self._count >= self.failures
            self._count += 1
            self._trial = False
            now_open = self._count >= self.failures
            if now_open:
                self._open_until = self.clock() + self.cooldown_s
        if now_open and not was_open and self.on_change:
            self.on_change(True, reason)
