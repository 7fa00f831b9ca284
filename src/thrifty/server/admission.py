"""Admission: how many generation requests this server holds, and when it says 400, 429 or 503.

A request is counted from admission until its answer is done; `waiting` is what the engines are not
running yet (read from their stats snapshots; remote requests count as waiting). With a deadline
(thrifty.server.deadline) a prompt is also judged against its tier's timeout and measured prefill rate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from thrifty.server.deadline import DeadlineAdmission
from thrifty.server.errors import PromptOverDeadlineError, ServerBusyError, ShuttingDownError


@dataclass(slots=True)
class Ticket:
    admitted: bool = True
    request_id: str | None = None            # set when the deadline reserved its prompt's work
    estimate_s: float | None = None          # estimated seconds to the first token (None: not judged)


class Admission:
    def __init__(self, max_waiting: int, running: Callable[[], int], rejected: Callable[[str], None],
                 deadline: DeadlineAdmission | None = None) -> None:
        self.max_waiting, self.running, self.rejected = max_waiting, running, rejected
        self.deadline = deadline
        self.draining = False
        self._active = 0

    def num_waiting(self) -> int:
        return max(0, self._active - self.running())

    def admit(self, prepared: Any = None) -> Ticket:
        """A ticket to release() when the answer is done, or ServerBusyError / ShuttingDownError /
        PromptOverDeadlineError. `prepared`: the request's BackendRequest, judged against the deadline."""
        if self.draining:
            self.rejected("shutting_down")
            raise ShuttingDownError("the server is shutting down", "retry on another replica")
        if self.num_waiting() >= self.max_waiting:
            self.rejected("queue_full")
            raise ServerBusyError(f"too many requests are waiting ({self.max_waiting}); the server is at capacity")
        ticket = Ticket()
        if self.deadline is not None and prepared is not None:
            param = "messages" if prepared.chat else "prompt"
            try:
                ticket.estimate_s = self.deadline.admit(prepared.request_id, prepared.checked_by,
                                                        len(prepared.prompt_ids), param)
            except PromptOverDeadlineError:
                self.rejected("over_deadline")
                raise
            except ServerBusyError:
                self.rejected("deadline_queue")
                raise
            ticket.request_id = prepared.request_id
        self._active += 1
        return ticket

    def started(self, ticket: Ticket) -> None:
        """The request's first token came: its prefill is no longer work ahead of others."""
        if self.deadline is not None and ticket.request_id is not None:
            self.deadline.started(ticket.request_id)

    def release(self, ticket: Ticket) -> None:
        if ticket.admitted:
            ticket.admitted = False
            self._active -= 1
            if self.deadline is not None and ticket.request_id is not None:
                self.deadline.release(ticket.request_id)
