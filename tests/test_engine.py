"""The engine on a tiny random model: batching, prefix caching, chunked prefill and preemption never change
greedy outputs; the paged engine equals a plain contiguous-cache greedy loop; requests are validated."""
from __future__ import annotations

import random

import pytest

from model_reference import greedy, load_thrifty
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.errors import InvalidRequestError
from thrifty.models.loader import load

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_engine(path, **options) -> LLMEngine:
    options.setdefault("dtype", "float32")
    config = EngineConfig(**options)
    return LLMEngine(load(path, config.dtype), config)


def run_all(engine: LLMEngine, prompts, params=GREEDY) -> list[list[int]]:
    outputs = engine.run(prompts, [params] * len(prompts))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [out.token_ids for out in outputs]


def mixed_prompts(n: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 1000) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(1, 1000) for _ in range(rng.randrange(1, 90))] for _ in range(n)]


@pytest.fixture(scope="module")
def alone(tiny_gguf):
    """Each prompt run by itself, one request in the engine."""
    engine = make_engine(tiny_gguf, enable_prefix_caching=False)
    prompts = mixed_prompts(32, shared_prefix=40)
    return prompts, [run_all(engine, [p])[0] for p in prompts]


def test_engine_equals_contiguous_greedy(tiny_gguf, alone):
    model, config = load_thrifty(tiny_gguf)
    prompts, outs = alone
    for p, out in list(zip(prompts, outs))[:4]:
        assert out == greedy(model, config, p, GREEDY.max_tokens)


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """The engine's fast path (thrifty's native kernels) and its torch reference path: both must give the outputs
    `alone` (run on the native path) gave."""
    if request.param == "torch":
        from thrifty import native

        monkeypatch.setattr(native, "runs", lambda t: False)
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("options", [
    dict(enable_prefix_caching=False),
    dict(enable_prefix_caching=True),
    dict(max_num_batched_tokens=24),                                   # chunked prefill
    dict(max_decode_slowdown=2.0),                                     # prefill budget beside decodes
    dict(num_kv_blocks=40, block_size=4),                              # forced preemption
    dict(scheduler_policy="static", max_num_seqs=8),
    dict(scheduler_policy="bucketed", max_num_seqs=8),
], ids=["batched", "prefix-cache", "chunked", "fair-prefill", "preemption", "static", "bucketed"])
def test_batch_of_32_matches_alone(tiny_gguf, alone, options, kernels):
    prompts, expected = alone
    engine = make_engine(tiny_gguf, **options)
    assert run_all(engine, prompts) == expected
    if options.get("num_kv_blocks"):
        assert engine.stats.preemptions > 0
    if options.get("enable_prefix_caching"):
        assert engine.block_manager.stats.hits > 0


def test_prefix_hits_are_reported_and_skip_compute(tiny_gguf):
    engine = make_engine(tiny_gguf, block_size=4)
    prefix = list(range(10, 50))
    first = run_all(engine, [prefix + [7, 8]])
    computed = engine.stats.prompt_tokens_computed
    rid = engine.add_request(prefix + [9, 9, 9], GREEDY)
    cached = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                cached = out.usage.cached_tokens
    assert cached == 40
    assert engine.stats.prompt_tokens_computed - computed == 3
    assert first


def test_seeded_sampling_is_batch_invariant(tiny_gguf):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    prompt = list(range(30, 60))
    alone = run_all(make_engine(tiny_gguf), [prompt], params)[0]
    engine = make_engine(tiny_gguf)
    others = [engine.add_request(p, SamplingParams(temperature=1.0, max_tokens=10)) for p in mixed_prompts(5, 3)]
    rid = engine.add_request(prompt, params)
    got = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                got = out.token_ids
    assert got == alone and others


def test_prompt_over_context_is_rejected_before_any_block(tiny_gguf):
    engine = make_engine(tiny_gguf, max_model_len=64)
    free = engine.block_manager.num_free_blocks
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request(list(range(1, 80)), GREEDY)
    assert engine.block_manager.num_free_blocks == free and not engine.has_unfinished()


def test_abort_frees_every_block(tiny_gguf):
    engine = make_engine(tiny_gguf, block_size=4)
    ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)) for p in mixed_prompts(6)]
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for rid in ids:
        engine.abort(rid)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()


def test_max_tokens_and_stop_token(tiny_gguf):
    engine = make_engine(tiny_gguf)
    prompt = list(range(5, 25))
    full = run_all(engine, [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(full) == 8
    stop_at = full[3]
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    assert final.finish_reason == "stop" and final.token_ids == full[:full.index(stop_at) + 1]
    assert rid == final.request_id


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(stop=3)])
def test_bad_sampling_params_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)
