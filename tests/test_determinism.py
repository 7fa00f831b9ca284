"""deterministic: true: the same tokens for a request alone and in any batch (greedy and seeded), in bf16, with
chunked prefill and preemption changing how its rows are grouped; refused where it cannot hold."""
from __future__ import annotations

import random

import pytest
import torch

from thrifty.engine import determinism
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.errors import InvalidRequestError
from thrifty.models.loader import load

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 1000) for _ in range(20)]
    return [prefix[:rng.randrange(0, 20)] + [rng.randrange(1, 1000) for _ in range(rng.randrange(1, 70))]
            for _ in range(n)]


def run(loaded, batch: list[list[int]], params: list[SamplingParams], **options) -> list[list[int]]:
    engine = LLMEngine(loaded, EngineConfig(dtype="bfloat16", deterministic=True, **options))
    return [out.token_ids for out in engine.run(batch, params)]


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    if not determinism.linear_rows_invariant(torch.bfloat16):
        pytest.skip("this CPU's bf16 matmul is not row-invariant: the mode refuses to start here (tested below)")
    return load(str(tiny_gguf), "bfloat16")


@pytest.fixture(scope="module")
def workload(loaded):
    """24 prompts, half greedy, half seeded sampling, each run alone."""
    ps = prompts(24)
    params = [GREEDY if i % 2 else SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=10,
                                                   ignore_eos=True) for i in range(len(ps))]
    return ps, params, [run(loaded, [p], [sp])[0] for p, sp in zip(ps, params)]


@pytest.mark.parametrize("options", [
    dict(),
    dict(max_num_batched_tokens=24),                       # prompts split over steps, beside decodes
    dict(num_kv_blocks=40, block_size=4),                  # preemption: recomputed in other groupings
    dict(max_num_batched_tokens=40, max_decode_slowdown=2.0),
], ids=["batched", "chunked", "preemption", "fair-prefill"])
def test_batched_equals_alone(loaded, workload, options):
    ps, params, alone = workload
    assert run(loaded, ps, params, **options) == alone


def test_refused_where_it_cannot_hold(tiny_gguf):
    with pytest.raises(InvalidRequestError, match="bf16 compute"):
        LLMEngine.from_model(str(tiny_gguf), dtype="float32", deterministic=True)
    with pytest.raises(InvalidRequestError, match="dense bf16 weights"):
        LLMEngine.from_model(str(tiny_gguf), dtype="bfloat16", weights="int8", deterministic=True)


def test_a_row_dependent_matmul_is_refused(tiny_gguf, monkeypatch):
    real = torch.nn.functional.linear

    def row_dependent(x, w, b=None):  # a library that switches kernels (and rounding) from 17 rows on
        out = real(x, w, b)
        return out + 1e-3 if x.shape[0] >= 17 else out

    monkeypatch.setattr(torch.nn.functional, "linear", row_dependent)
    assert not determinism.linear_rows_invariant(torch.bfloat16)
    with pytest.raises(InvalidRequestError, match="different results in batches"):
        LLMEngine.from_model(str(tiny_gguf), dtype="bfloat16", deterministic=True)


def test_one_row_calls_are_kept_off_a_gemv_that_rounds_differently(loaded, workload, monkeypatch):
    """What AVX512-BF16 CPUs do: a one-row bf16 linear takes a matrix-vector kernel with another reduction
    order. The mode pads such calls to two rows, so a request alone (one-row decodes) still equals it batched."""
    real = torch.nn.functional.linear

    def gemv_differs(x, w, b=None):
        out = real(x, w, b)
        return out * (1 + 2 ** -6) if x.dim() == 2 and x.shape[0] == 1 else out

    monkeypatch.setattr(torch.nn.functional, "linear", gemv_differs)
    assert determinism.linear_rows_invariant(torch.bfloat16)
    ps, params, _ = workload
    alone = [run(loaded, [p], [sp])[0] for p, sp in zip(ps[:6], params[:6])]
    assert run(loaded, ps[:6], params[:6]) == alone
