"""The CUDA-graph decode path's bookkeeping on a CPU: static buffers, batch and width buckets, padding rows that
write only the scratch block, fallback when a capture fails. A CPU has no graphs, so these tests replay each step
by running it (`eager_capture`): everything but the capture itself is what a GPU runs, and its outputs must be the
eager engine's. The capture itself is checked on a GPU by `thrifty bench step --device cuda`."""
from __future__ import annotations

import json
import random

import pytest
import torch

from thrifty.engine import cuda_graphs
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.models.loader import load

PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)


def engine_for(path, graphs: bool, monkeypatch, **options) -> LLMEngine:
    with monkeypatch.context() as m:
        if graphs:
            m.setattr(cuda_graphs, "capturer", lambda device: cuda_graphs.eager_capture)
        config = EngineConfig(dtype="float32", block_size=4, num_kv_blocks=96, max_num_seqs=5, **options)
        return LLMEngine(load(path, config.dtype), config)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 1000) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def test_batch_buckets():
    assert cuda_graphs.batch_buckets(1) == [1]
    assert cuda_graphs.batch_buckets(5) == [1, 2, 4, 8]
    assert cuda_graphs.batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert cuda_graphs.batch_buckets(70) == [1, 2, 4, 8, 16, 32, 48, 64, 80]


def test_graph_steps_equal_eager_steps(tiny_gguf, monkeypatch):
    """Batches of 1..5 (buckets 1, 2, 4, 8: padding rows), contexts crossing width buckets (4-token blocks)."""
    ps = prompts(9)
    eager = engine_for(tiny_gguf, False, monkeypatch)
    graphed = engine_for(tiny_gguf, True, monkeypatch)
    assert eager.runner.graphs is None and graphed.runner.graphs is not None
    want = eager.run(ps, [PARAMS] * len(ps))
    got = graphed.run(ps, [PARAMS] * len(ps))
    graphs = graphed.runner.graphs
    assert graphs.disabled is None
    assert {b for b, _ in graphs._replays} >= {4, 8} and len({w for _, w in graphs._replays}) >= 2
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.token_id == lb.token_id and la.logprob == pytest.approx(lb.logprob, abs=1e-4)
    assert graphed.block_manager.num_free_blocks == graphed.block_manager.num_blocks


def test_padding_rows_write_only_the_scratch_block(tiny_gguf, monkeypatch):
    """Three sequences replay the batch-4 graph: the fourth row's K/V lands in the scratch block, which the block
    manager never hands out; every block a sequence owns holds what the eager engine wrote there."""
    ps = prompts(3, seed=1)
    eager = engine_for(tiny_gguf, False, monkeypatch, enable_prefix_caching=False)
    graphed = engine_for(tiny_gguf, True, monkeypatch, enable_prefix_caching=False)
    scratch = graphed.kv_cache.scratch_block
    assert scratch == graphed.kv_cache.spec.num_blocks == graphed.block_manager.num_blocks
    layer = graphed.kv_cache.layers[0]
    assert not layer.k[:, scratch].any()
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for engine in (eager, graphed):
        for i, p in enumerate(ps):
            engine.add_request(p, params, f"r{i}")
        for _ in range(4):      # prefill, then decodes; all still running
            engine.step()
        assert len(engine.scheduler.running) == 3
    assert layer.k[:, scratch].any()
    for seq in graphed.scheduler.running:
        blocks = torch.tensor(graphed.block_manager.block_table(seq.request_id))
        assert scratch not in blocks.tolist()
        for g, e in zip(graphed.kv_cache.layers, eager.kv_cache.layers):
            assert torch.allclose(g.k[:, blocks], e.k[:, blocks], atol=1e-5)
            assert torch.allclose(g.v[:, blocks], e.v[:, blocks], atol=1e-5)


def test_a_failed_capture_turns_graphs_off(tiny_gguf, monkeypatch):
    def broken(step, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    ps = prompts(4, seed=2)
    eager = engine_for(tiny_gguf, False, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(cuda_graphs, "capturer", lambda device: broken)
        graphed = LLMEngine(eager.loaded, EngineConfig(dtype="float32", block_size=4, num_kv_blocks=96,
                                                       max_num_seqs=5))
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in graphed.run(ps, [plain] * 4)] == [o.token_ids for o in eager.run(ps, [plain] * 4)]
    assert "not permitted" in graphed.runner.graphs.disabled


def test_enforce_eager_and_windowed_models_build_no_graphs(tiny_gguf, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(cuda_graphs, "capturer", lambda device: cuda_graphs.eager_capture)
        engine = LLMEngine(load(tiny_gguf, "float32"), EngineConfig(dtype="float32", enforce_eager=True))
    assert engine.runner.graphs is None and engine.kv_cache.scratch_block is None
    assert cuda_graphs.capturer(torch.device("cpu")) is None


def test_gpu_check_parts_report_graphs_against_eager(tiny_gguf, monkeypatch):
    """The GPU check's timing and agreement parts on a CPU, graphs replayed eagerly: they run both modes and say
    which ran (the numbers mean nothing here)."""
    from thrifty.bench import gpu_check

    monkeypatch.setattr(cuda_graphs, "capturer", lambda device: cuda_graphs.eager_capture)
    loaded = load(tiny_gguf, "float32")
    agreement = gpu_check.bf16_agreement(loaded, tokens=4, batch=3)
    assert agreement["identical"] == "3/3"
    rows = gpu_check.throughput(loaded, [2, 4], float("-inf"), prompt_len=16, output_len=8)
    row = rows["2"]                                      # the first row runs whatever the deadline
    assert row["graphs"]["graphs"].endswith("graphs captured") and row["eager"]["graphs"] == "eager"
    assert row["graphs_over_eager"] > 0 and row["graphs"]["capture_s"] >= 0
    assert row["graphs"]["preemptions"] == row["eager"]["preemptions"] == 0
    assert "budget" in rows["4"]["skipped"]


def test_gpu_check_transformers_rows_skip_after_a_slow_one(tiny_gguf):
    """A transformers row over its time limit skips the larger batches and says why."""
    pytest.importorskip("transformers")
    from thrifty.bench import gpu_check
    from thrifty.bench.hf_peer import load_hf_model

    rows = gpu_check.hf_generate(load_hf_model(tiny_gguf, torch.float32), 500, [1, 2, 4], float("inf"), {},
                                 prompt_len=8, output_len=3, row_limit_s=0.0)
    assert rows["1"]["output_tokens"] == 3 and rows["1"]["output_tok_s"] > 0
    assert rows["1"]["thrifty_over_hf"] is None                  # no thrifty row to compare with
    assert rows["2"]["skipped"].startswith("c=1 took") and rows["4"]["skipped"] == rows["2"]["skipped"]


def test_gpu_check_end_to_end_with_transformers_rows(tiny_gguf, tmp_path, monkeypatch, capsys):
    """`python -m thrifty.bench.gpu_check` on a CPU at tiny sizes: every part reports, the transformers rows sit
    beside thrifty's in the JSON and the printed table, and the ratio is thrifty's tok/s over transformers'."""
    pytest.importorskip("transformers")
    from thrifty.bench import gpu_check

    monkeypatch.setattr(cuda_graphs, "capturer", lambda device: cuda_graphs.eager_capture)
    # bf16 on a CPU takes ~20 s here; the test above runs that part
    monkeypatch.setattr(gpu_check, "bf16_agreement", lambda loaded, tokens, batch: {"identical": "not run"})
    assert gpu_check.main([str(tiny_gguf), "--out", str(tmp_path), "--device", "cpu", "--tokens", "3",
                           "--batches", "1,2", "--concurrency", "1,2,4", "--prompt-len", "16",
                           "--output-len", "8"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for part in ("correctness_fp32", "steps", "throughput", "hf_generate"):
        assert "error" not in report[part], report[part]
    for c in (1, 2, 4):
        ours, hf = report["throughput"][str(c)], report["hf_generate"][str(c)]
        assert hf["output_tokens"] == 8 * c and hf["output_tok_s"] > 0 and hf["wall_s"] > 0
        assert hf["thrifty_over_hf"] == pytest.approx(ours["graphs"]["output_tok_s"] / hf["output_tok_s"])
    table = capsys.readouterr().out
    assert "thrifty / transformers" in table and "issue targets" in table
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["1", "2", "4"]
