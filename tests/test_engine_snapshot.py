"""The engine's public state for other threads (a frozen snapshot taken after each step), and a request that is
checked once on its way from the gateway to the engine."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from thrifty.engine.async_engine import AsyncEngine
from thrifty.engine.engine import LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.errors import InvalidRequestError
from thrifty.gateway.backends import LocalBackend
from thrifty.gateway.costs import FREE
from thrifty.gateway.gateway import Gateway, Tier
from thrifty.gateway.request import GatewayRequest
from thrifty.gateway.router import FixedRouter


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    return LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=64)


def counting_validate(engine: LLMEngine, monkeypatch) -> list[int]:
    calls: list[int] = []
    real = engine.validate

    def validate(prompt, params):
        calls.append(1)
        return real(prompt, params)

    monkeypatch.setattr(engine, "validate", validate)
    return calls


def test_snapshot_is_frozen_and_follows_the_steps(engine):
    aengine = AsyncEngine(engine)
    before = aengine.stats_snapshot()
    assert before.num_running == 0 and before.kv_blocks_free == before.kv_blocks_total == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.num_running = 1  # type: ignore[misc]

    async def run():
        return [o async for o in aengine.generate([5, 6, 7, 8], SamplingParams(max_tokens=3, ignore_eos=True))]

    outs = asyncio.run(run())
    after = aengine.stats_snapshot()
    assert outs[-1].finished and after is not before
    assert after.num_running == 0 and after.prefix_cache_queries >= before.prefix_cache_queries + 4
    assert after.max_model_len == engine.max_model_len


def test_a_request_is_validated_once_through_the_gateway(engine, monkeypatch):
    calls = counting_validate(engine, monkeypatch)
    gateway = Gateway([Tier("tiny", LocalBackend("tiny", AsyncEngine(engine)), FREE)], FixedRouter("tiny"))
    request = GatewayRequest("r-1", "tiny", chat=False, prompt=[5, 6, 7], params=SamplingParams(max_tokens=2))

    async def run():
        return [o async for o in gateway.generate(request)]

    assert asyncio.run(run())[-1].finished
    assert len(calls) == 1


def test_llm_engine_run_validates_each_prompt_once(engine, monkeypatch):
    calls = counting_validate(engine, monkeypatch)
    engine.run([[5, 6], [7, 8, 9]], [SamplingParams(max_tokens=1)] * 2)
    assert len(calls) == 2


def test_a_bad_request_fails_in_prepare_with_one_message(engine):
    gateway = Gateway([Tier("tiny", LocalBackend("tiny", AsyncEngine(engine)), FREE)], FixedRouter("tiny"))
    too_long = GatewayRequest("r-2", "tiny", chat=False, prompt=[5] * (engine.max_model_len + 1))
    with pytest.raises(InvalidRequestError, match="context holds") as e:
        gateway.prepare(too_long)
    assert e.value.param == "prompt"
    chat = GatewayRequest("r-3", "tiny", messages=[{"role": "user", "content": "x " * engine.max_model_len}])
    with pytest.raises(InvalidRequestError, match="context holds") as e:
        gateway.prepare(chat)
    assert e.value.param == "messages"
