"""`thrifty bench prefix`: requests sharing a long prefix, sent one after another, with and without prefix caching.

Each mode gets a fresh engine around the same loaded model. The first request of the caching run is cold; the
later ones can hit the prefix's blocks. Reported per mode: TTFT of every request (the cold first, the median
of the rest), prompt tokens the model computed (engine.stats.prompt_tokens_computed) and prefix-hit tokens.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from thrifty.bench import engine_run
from thrifty.bench.stats import hardware_info, now_iso, percentile
from thrifty.bench.workload import random_requests, shared_prefix_requests, token_high
from thrifty.errors import InvalidRequestError


@dataclass(slots=True)
class PrefixConfig:
    model: str
    shared_prefix: int = 2048
    suffix: int = 64
    requests: int = 16
    output_len: int = 8
    seed: int = 0
    dtype: str = "auto"
    kv_cache_memory: float = 1.0
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    threads: int | None = None
    weights: str = "auto"                 # weight format (thrifty.models.weight_spec)
    lm_head: str = "auto"                 # the output head's format (thrifty.models.lm_head)
    device: str | None = None             # auto / cpu / cuda
    warmup: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.shared_prefix < 1 or self.suffix < 1 or self.output_len < 1:
            raise InvalidRequestError("--shared-prefix, --suffix and --output-len must be >= 1", "",
                                      param="shared_prefix")
        if self.requests < 2:
            raise InvalidRequestError("--requests must be >= 2 (one cold, the rest can hit)", "", param="requests")

    def engine_options(self, caching: bool) -> dict:
        opts = {"dtype": self.dtype, "kv_cache_memory": self.kv_cache_memory, "block_size": self.block_size,
                "max_num_batched_tokens": self.max_num_batched_tokens, "enable_prefix_caching": caching,
                "max_num_seqs": 1}
        if self.threads:
            opts["num_threads"] = self.threads
        return opts


def run_prefix(cfg: PrefixConfig) -> dict:
    from thrifty.models.loader import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"loading {cfg.model} ...", file=sys.stderr, flush=True)
    loaded = load(cfg.model, cfg.dtype, cfg.device, weights=cfg.weights, lm_head=cfg.lm_head)
    high = token_high(min(loaded.config.vocab_size, loaded.tokenizer.vocab_size), loaded.tokenizer.stop_token_ids)
    prompt_len = cfg.shared_prefix + cfg.suffix
    if prompt_len + cfg.output_len > loaded.config.max_position_embeddings:
        raise InvalidRequestError(f"prefix + suffix + output ({prompt_len + cfg.output_len} tokens) exceed the "
                                  f"model's context ({loaded.config.max_position_embeddings})",
                                  "shorten --shared-prefix", param="shared_prefix")
    prompts = shared_prefix_requests(cfg.requests, cfg.shared_prefix, cfg.suffix, high, cfg.seed)
    if cfg.warmup:  # same shapes, unrelated tokens, caching off: no hit can leak into the measured runs
        other = random_requests(1, prompt_len, cfg.output_len, high, cfg.seed + 1)[0].prompt_ids
        engine_run.warm_up(loaded, cfg.engine_options(False), other, concurrency=1)
    results = [_run_mode(loaded, cfg, prompts, caching) for caching in (False, True)]
    off, on = results
    ratios = {
        "ttft_speedup_hit_vs_cold": _div(on["ttft_cold_s"], on["ttft_hit_p50_s"]),
        "ttft_speedup_hit_vs_no_caching": _div(off["ttft_hit_p50_s"], on["ttft_hit_p50_s"]),
        "prompt_tokens_computed_reduction": 1.0 - on["prompt_tokens_computed"] / off["prompt_tokens_computed"]
        if off["prompt_tokens_computed"] else None,
    }
    targets = {"ttft_speedup_hit_vs_cold": ">= 5", "prompt_tokens_computed_reduction": ">= 0.4"}
    met = {"ttft_speedup_hit_vs_cold": (ratios["ttft_speedup_hit_vs_cold"] or 0) >= 5,
           "prompt_tokens_computed_reduction": (ratios["prompt_tokens_computed_reduction"] or 0) >= 0.4}
    return {"benchmark": "prefix", "date": now_iso(),
            "model": {"spec": cfg.model, "name": loaded.config.name, "path": str(loaded.path),
                      "dtype": str(loaded.dtype).removeprefix("torch.")},
            "hardware": hardware_info(), "config": asdict(cfg), "results": results, "ratios": ratios,
            "targets": targets, "met": met}


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _run_mode(loaded, cfg: PrefixConfig, prompts: list[list[int]], caching: bool) -> dict:
    engine = engine_run.make_engine(loaded, **cfg.engine_options(caching))
    per_request = []
    label = "prefix caching" if caching else "no prefix caching"
    for i, prompt in enumerate(tqdm(prompts, desc=label, unit="req", disable=not cfg.progress, leave=False)):
        before = engine.stats.prompt_tokens_computed
        engine.add_request(prompt, engine_run.greedy_exact(cfg.output_len), f"prefix-{i}")
        final = None
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    final = out
        per_request.append({"index": i, "ttft_s": final.usage.time_to_first_token_s,
                            "tpot_s": final.usage.time_per_output_token_s,
                            "cached_tokens": final.usage.cached_tokens,
                            "prompt_tokens_computed": engine.stats.prompt_tokens_computed - before})
    hits = [r["ttft_s"] for r in per_request[1:]]
    bm = engine.block_manager.stats
    return {
        "prefix_caching": caching,
        "ttft_cold_s": per_request[0]["ttft_s"],
        "ttft_hit_p50_s": percentile(hits, 50),
        "ttft_p50_s": percentile([r["ttft_s"] for r in per_request], 50),
        "prompt_tokens": len(prompts[0]) * len(prompts),
        "prompt_tokens_computed": engine.stats.prompt_tokens_computed,
        "cached_tokens": sum(r["cached_tokens"] for r in per_request),
        "prefix_cache": {"queries": bm.queries, "hits": bm.hits, "hit_rate": bm.hit_rate},
        "requests": per_request,
    }


def format_report(report: dict) -> str:
    from thrifty.bench.report import markdown_table

    c, m, h = report["config"], report["model"], report["hardware"]
    rows = [["on" if r["prefix_caching"] else "off", r["ttft_cold_s"], r["ttft_hit_p50_s"], r["prompt_tokens"],
             r["prompt_tokens_computed"], r["cached_tokens"]] for r in report["results"]]
    ra, targets, met = report["ratios"], report["targets"], report["met"]
    ratio_rows = [[name, value, targets.get(name), met.get(name)] for name, value in ra.items()]
    return "\n".join([
        f"## prefix caching: {m['name']} ({m['dtype']}), {c['requests']} requests, shared prefix {c['shared_prefix']}"
        f" + suffix {c['suffix']}, output {c['output_len']}, sent one after another",
        f"{h['cpu']}, {h['cores']} cores, {h['torch_threads']} torch threads, torch {h['torch_version']}; "
        f"{report['date']}", "",
        markdown_table(["prefix caching", "TTFT first (cold) s", "TTFT rest p50 s", "prompt tokens",
                        "prompt tokens computed", "prefix-hit tokens"], rows), "",
        markdown_table(["ratio", "value", "target", "met"], ratio_rows)])
