"""AsyncEngine: LLMEngine behind an asyncio interface, for the server and the local backend.

One background task drives `step()` in a worker thread, so the event loop keeps serving HTTP while the
model computes. Requests and aborts are queued and applied between steps, so the engine itself is only
ever touched by that one thread. A consumer that stops iterating (client gone, task cancelled) aborts
its request, which frees its KV blocks at the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from thrifty.engine.engine import LLMEngine, RequestOutput
from thrifty.engine.sampling import SamplingParams


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
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

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def num_requests(self) -> int:
        return len(self._queues)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       extra_key: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs of one request; bad input raises InvalidRequestError before anything is queued."""
        self.engine.validate(prompt, params)
        request_id = request_id or f"areq-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._submit(_Add(request_id, prompt, params, extra_key))
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
                    self.engine.add_request(op.prompt, op.params, op.request_id, op.extra_key)
                except Exception as e:
                    failed.append((op.request_id, e))
        return self.engine.step(), failed

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
