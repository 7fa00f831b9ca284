"""`thrifty bench window`: the KV memory a sliding-window model holds at a long context, freeing blocks that left
the window (engine/kv_groups.py) against an unbounded cache that keeps every block, and their outputs.

One prompt of `context - output_len` tokens of held-out text (thrifty.quantizers.data, the text `thrifty eval
ppl` scores), greedy to `context` tokens, once per cache mode on the same loaded model. KV held is counted
from the block managers after every step (the blocks requests reference, times each group's bytes per block);
"full attention" is what every layer keeping every block of the context would take.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from thrifty.bench.stats import hardware_info, now_iso
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.kv_cache import block_bytes
from thrifty.engine.kv_groups import held_kv_bytes, kv_groups
from thrifty.engine.sampling import SamplingParams


@dataclass(slots=True)
class ModeResult:
    free_window_blocks: bool
    token_ids: list[int]
    peak_held_bytes: int        # max over steps, counted after each step
    final_held_bytes: int       # after the step that reached the full context
    prefill_s: float
    decode_s: float

    def as_dict(self) -> dict:
        return {"free_window_blocks": self.free_window_blocks, "peak_held_kv_bytes": self.peak_held_bytes,
                "final_held_kv_bytes": self.final_held_bytes, "prefill_s": round(self.prefill_s, 3),
                "decode_s": round(self.decode_s, 3), "output_token_ids": self.token_ids}


def long_prompt(tokenizer, num_tokens: int) -> list[int]:
    """`num_tokens` tokens of held-out prose then code (repeated if the text runs short)."""
    from thrifty.quantizers import data

    ids: list[int] = []
    for domain in ("prose", "code"):
        ids += data.eval_windows(tokenizer, domain, num_tokens, seq_len=num_tokens)[0]
    while len(ids) < num_tokens:
        ids += ids
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token and tokenizer.bos_token_id is not None else []
    return (bos + ids)[:num_tokens]


def run_mode(loaded, prompt: list[int], output_len: int, free: bool, block_size: int,
             max_num_batched_tokens: int) -> ModeResult:
    context = len(prompt) + output_len
    config = EngineConfig(free_window_blocks=free, max_num_seqs=1, block_size=block_size,
                          max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False,
                          num_kv_blocks=-(-context // block_size) + 1)
    engine = LLMEngine(loaded, config)
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    peak = final = 0
    tokens: list[int] = []
    started = time.perf_counter()
    first_token_at = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids and first_token_at is None:
                first_token_at = time.perf_counter()
            if out.finished:
                tokens = out.token_ids
        running = engine.scheduler.running
        if running:
            final = held_kv_bytes(engine.block_manager, engine.kv_cache)
            peak = max(peak, final)
    end = time.perf_counter()
    first_token_at = first_token_at or end
    return ModeResult(free, tokens, peak, final, first_token_at - started, end - first_token_at)


def run_window_bench(model: str, context: int = 8192, output_len: int = 32, dtype: str = "auto",
                     weights: str = "auto", block_size: int = 16, max_num_batched_tokens: int = 2048,
                     log=print) -> dict:
    """Both cache modes on one prompt; the report the CLI prints and writes (another bench may call this)."""
    from thrifty.models.loader import load

    loaded = load(model, dtype, weights=weights)
    cfg = loaded.config
    if context > cfg.max_position_embeddings:
        context = cfg.max_position_embeddings
    prompt = long_prompt(loaded.tokenizer, context - output_len)
    groups = kv_groups(cfg)
    kv_dtype = loaded.dtype
    full_bytes = -(-context // block_size) * block_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                         block_size, kv_dtype)
    run_mode(loaded, prompt[:4 * block_size], 2, True, block_size, max_num_batched_tokens)  # warm-up, not timed
    results = []
    for free in (True, False):
        log(f"{'freeing window blocks' if free else 'unbounded cache'}: {len(prompt)} prompt tokens + {output_len}")
        results.append(run_mode(loaded, prompt, output_len, free, block_size, max_num_batched_tokens))
    freed, unbounded = results
    return {
        "bench": "window",
        "model": str(model),
        "created": now_iso(),
        "config": {"context": context, "prompt_tokens": len(prompt), "output_len": output_len,
                   "dtype": str(kv_dtype).removeprefix("torch."), "weights": loaded.weights, "block_size": block_size,
                   "max_num_batched_tokens": max_num_batched_tokens, "prompt_text": "held-out prose + code "
                   "(thrifty.quantizers.data)"},
        "model_config": {"num_layers": cfg.num_layers, "sliding_window": cfg.sliding_window,
                         "sliding_window_pattern": cfg.sliding_window_pattern,
                         "kv_groups": [{"window": g.window, "layers": list(g.layers)} for g in groups]},
        "full_attention_kv_bytes": full_bytes,
        "results": [r.as_dict() for r in results],
        "held_vs_full_attention": round(freed.final_held_bytes / full_bytes, 4),
        "peak_held_vs_full_attention": round(freed.peak_held_bytes / full_bytes, 4),
        "unbounded_held_vs_full_attention": round(unbounded.final_held_bytes / full_bytes, 4),
        "outputs_identical": freed.token_ids == unbounded.token_ids,
        "note": "held KV is counted after each step; within a prefill step the local layers also hold the chunk "
                "being computed (up to max_num_batched_tokens) until the step ends",
        "hardware": hardware_info(),
    }


def summary(report: dict) -> str:
    from thrifty.bench.report import fmt, markdown_table

    rows = [[("free window blocks" if r["free_window_blocks"] else "unbounded"),
             fmt(r["final_held_kv_bytes"] / 2**20), fmt(r["peak_held_kv_bytes"] / 2**20),
             fmt(r["final_held_kv_bytes"] / report["full_attention_kv_bytes"]), fmt(r["prefill_s"]),
             fmt(r["decode_s"])] for r in report["results"]]
    table = markdown_table(["cache", "held KV MiB", "peak MiB", "x full attention", "prefill s", "decode s"], rows)
    return (f"{table}\nfull attention at {report['config']['context']} tokens: "
            f"{report['full_attention_kv_bytes'] / 2**20:.1f} MiB; outputs identical: {report['outputs_identical']}")
