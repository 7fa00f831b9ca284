"""Coalescer: identical in-flight requests run once; each subscriber gets every output."""
from __future__ import annotations

import asyncio

import pytest

from thrifty.gateway.coalesce import Coalescer


def run(coro):
    return asyncio.run(coro)


class Source:
    def __init__(self, n: int = 5, delay: float = 0.01, fail_at: int | None = None) -> None:
        self.calls, self.closed, self.n, self.delay, self.fail_at = 0, 0, n, delay, fail_at

    def __call__(self):
        self.calls += 1
        return self._gen()

    async def _gen(self):
        try:
            for i in range(self.n):
                await asyncio.sleep(self.delay)
                if i == self.fail_at:
                    raise RuntimeError("engine failed")
                yield i
        finally:
            self.closed += 1


async def collect(it):
    return [x async for x in it]


def test_many_waiters_one_call():
    async def main():
        c, src = Coalescer(), Source()
        finished = []

        async def on_finish(last):
            finished.append(last)

        joins = [c.join("k", src, on_finish) for _ in range(64)]
        assert [leader for _, leader in joins].count(True) == 1
        results = await asyncio.gather(*(collect(it) for it, _ in joins))
        await asyncio.sleep(0)
        assert src.calls == 1 and finished == [4]
        assert all(r == [0, 1, 2, 3, 4] for r in results)
        assert c.in_flight() == 0
    run(main())


def test_late_joiner_gets_everything_from_the_start():
    async def main():
        c, src = Coalescer(), Source(n=6, delay=0.02)
        first, _ = c.join("k", src)
        task = asyncio.create_task(collect(first))
        await asyncio.sleep(0.07)
        late, leader = c.join("k", src)
        assert not leader
        assert await collect(late) == list(range(6)) and await task == list(range(6))
        assert src.calls == 1
    run(main())


def test_leader_leaving_does_not_stop_the_others():
    async def main():
        c, src = Coalescer(), Source(n=5, delay=0.02)
        a, _ = c.join("k", src)
        b, _ = c.join("k", src)
        got = []
        async for x in a:
            got.append(x)
            break
        await a.aclose()
        assert await collect(b) == list(range(5)) and src.calls == 1
    run(main())


def test_everyone_leaving_cancels_the_flight():
    async def main():
        c, src = Coalescer(), Source(n=100, delay=0.01)
        a, _ = c.join("k", src)
        async for _ in a:
            break
        await a.aclose()
        await asyncio.sleep(0.05)
        assert src.closed == 1 and c.in_flight() == 0
    run(main())


def test_error_reaches_every_waiter_and_nothing_is_stored():
    async def main():
        c, src = Coalescer(), Source(fail_at=2)
        stored = []

        async def on_finish(last):
            stored.append(last)

        its = [c.join("k", src, on_finish)[0] for _ in range(3)]
        for it in its:
            with pytest.raises(RuntimeError, match="engine failed"):
                await collect(it)
        assert stored == [] and c.in_flight() == 0
    run(main())


def test_different_keys_run_separately():
    async def main():
        c, src = Coalescer(), Source(n=2)
        (a, la), (b, lb) = c.join("x", src), c.join("y", src)
        assert la and lb
        await asyncio.gather(collect(a), collect(b))
        assert src.calls == 2
    run(main())
