"""Coalescing: identical requests in flight together run once, and every waiter gets the answer.

The first request for a key starts a *flight*: a task that drives the one generation and records every
output. Requests for the same key that arrive while it flies subscribe to it and receive all outputs
from the start (streamed to each, as they come). The generation belongs to the flight, not to the first
client: when that client leaves, the others still get their answer; when every subscriber has left, the
flight is cancelled (which aborts the engine request). `on_finish` runs with the final output before the
flight is forgotten, so a request arriving meanwhile still joins it instead of starting another.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable


@dataclass(slots=True)
class Flight:
    key: str
    outputs: list[Any] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    subscribers: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task | None = None


class Coalescer:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def in_flight(self) -> int:
        return len(self._flights)

    def join(self, key: str, start: Callable[[], AsyncIterator[Any]],
             on_finish: Callable[[Any], Awaitable[None]] | None = None) -> tuple[AsyncIterator[Any], bool]:
        """(outputs, leader): leader is True for the request that started the generation."""
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            flight = self._flights[key] = Flight(key)
            flight.task = asyncio.get_running_loop().create_task(self._fly(flight, start, on_finish))
        flight.subscribers += 1
        return self._follow(flight), leader

    async def _fly(self, flight: Flight, start: Callable[[], AsyncIterator[Any]],
                   on_finish: Callable[[Any], Awaitable[None]] | None) -> None:
        gen = start()
        try:
            async for out in gen:
                async with flight.changed:
                    flight.outputs.append(out)
                    flight.changed.notify_all()
        except BaseException as e:  # noqa: BLE001 -- every subscriber sees the error
            flight.error = e
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await _aclose(gen)
            async with flight.changed:
                flight.done = True
                flight.changed.notify_all()
            try:
                if on_finish is not None and flight.error is None and flight.outputs:
                    await on_finish(flight.outputs[-1])
            finally:
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]

    async def _follow(self, flight: Flight) -> AsyncIterator[Any]:
        i = 0
        try:
            while True:
                async with flight.changed:
                    while i >= len(flight.outputs) and not flight.done:
                        await flight.changed.wait()
                    batch = flight.outputs[i:]
                    finished = flight.done
                for out in batch:
                    yield out
                i += len(batch)
                if finished and i >= len(flight.outputs):
                    if flight.error is not None and not isinstance(flight.error, asyncio.CancelledError):
                        raise flight.error
                    return
        finally:
            flight.subscribers -= 1
            if flight.subscribers == 0 and not flight.done and flight.task is not None:
                flight.task.cancel()
                if self._flights.get(flight.key) is flight:
                    del self._flights[flight.key]


async def _aclose(gen: Any) -> None:
    close = getattr(gen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001
            pass
