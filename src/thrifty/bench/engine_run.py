"""Drive thrifty's LLMEngine through a closed loop of `concurrency` clients and measure it.

Arrival pattern (as vLLM's benchmark_serving with --max-concurrency C and an infinite request rate): a fixed
list of requests, at most C in flight; each time one finishes the next one is added before the next step.
TTFT counts from the moment a request is added to the engine (client-side waiting for a free slot is not
counted), like the serving benchmark measures from the moment a request is sent.
"""
from __future__ import annotations

import time
from collections import deque

from tqdm.auto import tqdm

from thrifty.bench.stats import RunResult
from thrifty.bench.workload import BenchRequest
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.models.loader import LoadedModel


def make_engine(loaded: LoadedModel, **options) -> LLMEngine:
    """A fresh engine (own KV cache, block manager, stats) around an already loaded model."""
    return LLMEngine(loaded, EngineConfig(**options))


def greedy_exact(n: int) -> SamplingParams:
    """Greedy, exactly n tokens: EOS and stop tokens ignored, no detokenizer-driven stops."""
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def warm_up(loaded: LoadedModel, engine_options: dict, prompt_ids: list[int], concurrency: int = 2) -> None:
    """A few steps so first-call costs (allocator, oneDNN primitives) are not charged to the first measured run."""
    engine = make_engine(loaded, **{**engine_options, "max_num_seqs": max(concurrency, 1)})
    for i in range(concurrency):
        engine.add_request(prompt_ids, greedy_exact(4), f"warm-{i}")
    while engine.has_unfinished():
        engine.step()


def run_closed_loop(engine: LLMEngine, requests: list[BenchRequest], concurrency: int,
                    desc: str = "", progress: bool = True) -> tuple[float, list]:
    """Feed `requests` keeping `concurrency` in flight; (wall seconds, finished RequestOutputs in finish order)."""
    pending = deque(enumerate(requests))
    finished = []

    def submit() -> None:
        i, req = pending.popleft()
        engine.add_request(req.prompt_ids, greedy_exact(req.output_len), f"bench-{i}")

    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False) as bar:
        start = time.monotonic()
        for _ in range(min(concurrency, len(pending))):
            submit()
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished.append(out)
                    bar.update(1)
                    if pending:
                        submit()
        duration = time.monotonic() - start
    return duration, finished


def bench_engine(loaded: LoadedModel, requests: list[BenchRequest], concurrency: int, policy: str,
                 engine_options: dict, progress: bool = True) -> RunResult:
    """One measured run of thrifty at one concurrency and scheduler policy; a fresh engine, so fresh stats."""
    engine = make_engine(loaded, **{**engine_options, "scheduler_policy": policy, "max_num_seqs": concurrency})
    duration, outs = run_closed_loop(engine, requests, concurrency, f"thrifty {policy} c={concurrency}", progress)
    s = engine.stats
    contiguous = engine.max_model_len * s.kv_seq_steps
    result = RunResult.from_timings(
        "thrifty", policy, concurrency, duration, sum(len(o.token_ids) for o in outs),
        [o.usage.time_to_first_token_s for o in outs], [o.usage.time_per_output_token_s for o in outs],
        kv_waste=s.kv_waste,
        kv_waste_contiguous=1.0 - s.kv_slots_used / contiguous if contiguous else None,
        extra={"steps": s.steps, "preemptions": s.preemptions, "tokens_computed": s.tokens_computed,
               "prompt_tokens_computed": s.prompt_tokens_computed, "max_model_len": engine.max_model_len,
               "max_num_seqs": concurrency})
    engine.abort_all()
    return result
