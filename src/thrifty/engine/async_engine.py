"""AsyncEngine: LLMEngine behind an asyncio interface, for the server and the local backend.

One background task drives `step()` in a worker thread, so the event loop keeps serving HTTP while the
model computes. Requests and aborts are queued and applied between steps, so the engine itself is only
ever touched by that one thread; other threads read its state from `stats_snapshot()`, which that thread
takes after every step. A request is validated once, here, before it is queued. A consumer that stops iterating (client gone, task cancelled) aborts
its request, which frees its KV blocks at the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from thrifty.engine.engine import LLMEngine, RequestOutput, ValidRequest
from thrifty.engine.sampling import SamplingParams
from thrifty.engine.snapshot import EngineSnapshot


@dataclass(slots=True)
class _Add:
    request_id: str
    request: ValidRequest
    extra_key: str | None


@dataclass(slots=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: list[_Add | _Abort] = []
        self._lock = threading.Lock()           # guards _pending between the loop and the worker thread
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.errored: BaseException | None = None
        self._snapshot = EngineSnapshot.of(engine)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def num_requests(self) -> int:
        return len(self._queues)

    def stats_snapshot(self) -> EngineSnapshot:
        """The engine's state after its last step; safe from any thread."""
        return self._snapshot

    def validate(self, prompt: str | list[int], params: SamplingParams) -> ValidRequest:
        """The checked request (InvalidRequestError when it is bad); reads only the engine's constants."""
        return self.engine.validate(prompt, params)

    async def generate(self, prompt: str | list[int] | ValidRequest, params: SamplingParams | None = None,
                       request_id: str | None = None, extra_key: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs of one request; bad input raises InvalidRequestError before anything is queued.
        `prompt` may be what validate() returned (then `params` is ignored)."""
        valid = prompt if isinstance(prompt, ValidRequest) else self.engine.validate(prompt, params)
        request_id = request_id or f"areq-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._submit(_Add(request_id, valid, extra_key))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._submit(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    def _submit(self, op: _Add | _Abort) -> None:
        with self._lock:
            self._pending.append(op)
        self._ensure_loop()
        self._wake.set()

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            with self._lock:
                idle = not self._pending and not self.engine.has_unfinished()
            if idle:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs, failed = await asyncio.to_thread(self._step)
            except Exception as e:  # a broken step fails the requests in flight, not the server
                self.errored = e
                for queue in list(self._queues.values()):
                    queue.put_nowait(e)
                self.engine.abort_all()
                self._snapshot = EngineSnapshot.of(self.engine)
                continue
            for request_id, item in [*failed, *((o.request_id, o) for o in outputs)]:
                queue = self._queues.get(request_id)
                if queue is not None:
                    queue.put_nowait(item)

    def _step(self) -> tuple[list[RequestOutput], list[tuple[str, Exception]]]:
        """Runs in the worker thread: apply queued adds and aborts, then one engine step."""
        with self._lock:
            ops, self._pending = self._pending, []
        failed = []
        for op in ops:
            if isinstance(op, _Abort):
                self.engine.abort(op.request_id)
            elif op.request_id in self._queues:  # not cancelled while queued
                try:
                    self.engine.add_request(op.request, None, op.request_id, op.extra_key)
                except Exception as e:
                    failed.append((op.request_id, e))
        try:
            return self.engine.step(), failed
        finally:
            self._snapshot = EngineSnapshot.of(self.engine)

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
