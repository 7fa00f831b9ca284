"""Sliding-window KV on a tiny Gemma 3 (8-token window, 4-token blocks): local layers free the blocks that left
their window, and greedy outputs equal those of an unbounded cache (every block kept) under batching, chunked
prefill, preemption and prefix caching, while a local layer never holds more than window + one block per
sequence between steps."""
from __future__ import annotations

import random

import pytest

from model_reference import greedy, load_thrifty
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.kv_groups import GroupedBlockManager, held_kv_bytes, kv_groups, window_blocks
from thrifty.engine.sampling import SamplingParams
from thrifty.models.loader import load
from tiny_gguf import tiny_gemma3, write_tiny_gguf

BS, WINDOW = 4, 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gemma") / "gemma3.gguf", tiny_gemma3(sliding_window=WINDOW))


def prompts(n: int, seed: int = 0, shared: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 600) for _ in range(shared)]
    return [prefix + [rng.randrange(1, 600) for _ in range(rng.randrange(20, 70))] for _ in range(n)]


def engine(path, **options) -> LLMEngine:
    config = EngineConfig(dtype="float32", block_size=BS, **options)
    return LLMEngine(load(path, config.dtype), config)


def run_checked(eng: LLMEngine, batch: list[list[int]]) -> list[list[int]]:
    """Run to the end, checking after every step that each local table holds at most window + one block."""
    bm = eng.block_manager
    ids = [eng.add_request(p, GREEDY) for p in batch]
    outputs: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids
        if isinstance(bm, GroupedBlockManager):
            local = bm.managers[1]
            for seq in eng.scheduler.running:
                held = [b for b in local.block_table(seq.request_id) if b != local.null_block]
                assert len(held) <= window_blocks(WINDOW, BS), (seq.request_id, len(held))
    assert bm.num_free_blocks == bm.num_blocks
    return [outputs[i] for i in ids]


@pytest.fixture(scope="module")
def unbounded(gemma):
    batch = prompts(12, shared=24)
    return batch, run_checked(engine(gemma, free_window_blocks=False, enable_prefix_caching=False), batch)


def test_groups_split_local_from_global(gemma):
    _, config = load_thrifty(gemma)
    groups = kv_groups(config)
    assert [(g.window, g.layers) for g in groups] == [(None, (1, 3)), (WINDOW, (0, 2))]
    assert [(g.window, g.layers) for g in kv_groups(config, free_window_blocks=False)] == [(None, (0, 1, 2, 3))]


def test_unbounded_engine_equals_contiguous_greedy(gemma, unbounded):
    model, config = load_thrifty(gemma)
    batch, outs = unbounded
    for p, out in list(zip(batch, outs))[:3]:
        assert greedy(model, config, p, GREEDY.max_tokens) == out


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 13},                      # chunked prefill: chunks end mid-block, mid-window
    {"num_kv_blocks": 40, "max_num_seqs": 12},           # the global pool runs out: preemption
    {"max_num_seqs": 3, "max_num_batched_tokens": 9},
], ids=["batch", "chunked", "preempted", "few-seqs"])
def test_freeing_window_blocks_keeps_greedy_outputs(gemma, unbounded, options):
    batch, expected = unbounded
    eng = engine(gemma, **options)
    assert isinstance(eng.block_manager, GroupedBlockManager)
    assert run_checked(eng, batch) == expected
    if "num_kv_blocks" in options:
        assert eng.stats.preemptions > 0


def test_prefix_hits_on_window_layers_keep_outputs(gemma, unbounded):
    """The same batch twice: the second run hits the cached prefixes (local layers only need the window
    before the hit point) and still decodes the same tokens."""
    batch, expected = unbounded
    eng = engine(gemma, max_num_seqs=4)
    assert run_checked(eng, batch) == expected
    hits_before = eng.block_manager.stats.hits
    assert run_checked(eng, batch) == expected
    assert eng.block_manager.stats.hits > hits_before


def test_held_kv_is_bounded_on_long_decodes(gemma):
    """One request decoding far past the window: the local group's held blocks stop growing; the held KV
    is what the global layers hold plus a window's worth for the local ones."""
    eng = engine(gemma, max_num_seqs=1)
    eng.add_request(prompts(1, seed=5)[0], SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True))
    peak_local = 0
    while eng.has_unfinished():
        eng.step()
        local = eng.block_manager.managers[1]
        peak_local = max(peak_local, local.num_held_blocks)
    assert peak_local <= window_blocks(WINDOW, BS)
    assert held_kv_bytes(eng.block_manager, eng.kv_cache) == 0


def test_window_bench_reports_held_kv_and_identical_outputs(gemma):
    from thrifty.bench.window import run_window_bench, summary

    report = run_window_bench(str(gemma), context=96, output_len=8, dtype="float32", block_size=BS,
                              max_num_batched_tokens=20, log=lambda m: None)
    assert report["outputs_identical"]
    assert report["unbounded_held_vs_full_attention"] == 1.0
    # 2 of 4 layers global, the local ones a window's worth of 96 tokens
    assert 0.5 < report["held_vs_full_attention"] < 0.5 + 0.5 * window_blocks(WINDOW, BS) * BS / 96 + 1e-9
    assert "held KV MiB" in summary(report)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_quantized_kv_frees_window_blocks_with_the_same_outputs(gemma, kv_dtype):
    """int8 / fp8 KV on the window groups (each group's K transform is its layers' slice): freeing blocks
    changes nothing, with prefix hits, and the quantized cache stays close to the float one."""
    batch = prompts(6, seed=3, shared=24)
    kept = run_checked(engine(gemma, kv_cache_dtype=kv_dtype, free_window_blocks=False), batch)
    freed_engine = engine(gemma, kv_cache_dtype=kv_dtype)
    assert isinstance(freed_engine.block_manager, GroupedBlockManager)
    assert run_checked(freed_engine, batch) == kept
    floats = run_checked(engine(gemma), batch)
    same_first = sum(a[0] == b[0] for a, b in zip(kept, floats))
    assert same_first >= len(batch) - 1, same_first
