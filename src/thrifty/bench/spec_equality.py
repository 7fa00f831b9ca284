"""`thrifty bench spec-equality`: greedy outputs with and without speculation on the HumanEval chat prompts.

The issue's check: all 164 prompts, 64 tokens each, the same tokens token for token. float32 by default: in
bf16 a one-token decode and a multi-token verification round differently and may flip a near-tie, which is
rounding, not a verification bug.
"""
from __future__ import annotations

import time

from thrifty.bench.spec import workload_messages
from thrifty.bench.stats import hardware_info, now_iso
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams


def run_equality(model: str, method: str = "ngram", prompts: int = 164, max_tokens: int = 64,
                 dtype: str = "float32", batch: int = 16, draft: str | None = None, weights: str = "auto") -> dict:
    from thrifty.models.loader import load

    loaded = load(model, dtype, weights=weights)
    tok = loaded.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True),
                      add_special_tokens=False) for m in workload_messages("chat", prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs, walls, accepted = {}, {}, 0
    for name in ("off", method):
        # the draft alone (no n-gram first): its model then drafts for every request in every step
        spec = None if name == "off" else {"method": method, "draft_model": draft, "disable_by_batch_size": batch + 1,
                                           **({"ngram_first": False} if method == "draft" else {})}
        engine = LLMEngine(loaded, EngineConfig(dtype=dtype, weights=weights, kv_cache_memory=0.5,
                                                max_num_seqs=batch, speculative=spec))
        start = time.perf_counter()
        outs[name] = [o.token_ids for o in engine.run(ids, [params] * len(ids))]
        walls[name] = time.perf_counter() - start
        if engine.speculator is not None:
            accepted = engine.speculator.stats.num_accepted_tokens
    differ = [i for i, (a, b) in enumerate(zip(outs["off"], outs[method])) if a != b]
    return {"benchmark": "spec-equality", "date": now_iso(), "model": model, "method": method, "draft": draft,
            "dtype": dtype, "weights": weights, "prompts": len(ids), "max_tokens": max_tokens, "batch": batch,
            "identical": len(ids) - len(differ), "differ": differ, "accepted_tokens": accepted, "wall_s": walls,
            "hardware": hardware_info()}


def format_report(report: dict) -> str:
    return (f"{report['identical']} of {report['prompts']} HumanEval chat prompts identical with {report['method']} "
            f"speculation ({report['model']}, {report['dtype']}, {report['max_tokens']} tokens; "
            f"{report['accepted_tokens']} draft tokens kept); differ: {report['differ']}")
