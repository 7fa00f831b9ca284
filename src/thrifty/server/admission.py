"""Admission: how many generation requests this server holds, and when it says 429 or 503.

A request is counted from admission until its answer is done; `waiting` is what the engines are not
running yet (read from their stats snapshots; remote requests count as waiting)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from thrifty.server.errors import ServerBusyError, ShuttingDownError


@dataclass(slots=True)
class Ticket:
    admitted: bool = True


class Admission:
    def __init__(self, max_waiting: int, running: Callable[[], int], rejected: Callable[[str], None]) -> None:
        self.max_waiting, self.running, self.rejected = max_waiting, running, rejected
        self.draining = False
        self._active = 0

    def num_waiting(self) -> int:
        return max(0, self._active - self.running())

    def admit(self) -> Ticket:
        """A ticket to release() when the answer is done, or ServerBusyError / ShuttingDownError."""
        if self.draining:
            self.rejected("shutting_down")
            raise ShuttingDownError("the server is shutting down", "retry on another replica")
        if self.num_waiting() >= self.max_waiting:
            self.rejected("queue_full")
            raise ServerBusyError(f"too many requests are waiting ({self.max_waiting}); the server is at capacity")
        self._active += 1
        return Ticket()

    def release(self, ticket: Ticket) -> None:
        if ticket.admitted:
            ticket.admitted = False
            self._active -= 1
