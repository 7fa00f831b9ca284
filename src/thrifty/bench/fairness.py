"""`thrifty bench fairness`: what one long prompt does to everyone else, with and without the prefill budget.

Per mode (scheduler `max_decode_slowdown` off, then each given value), one engine around the same model:
1. unloaded: `streams` requests decode alone; their time per output token (TPOT) is the reference;
2. loaded: the same streams decode, a `long`-token prompt arrives, and a `short`-token request arrives every
   `short_every_s` seconds until the long prompt's first token. Reported: the shorts' TTFT (p50 / p99), the
   streams' inter-token times while the long prompt prefilled (p50 / p99, and p99 over the unloaded TPOT),
   and the long prompt's own TTFT.
Arrivals follow the wall clock between engine steps (a request that arrives during a step waits for it, as in a
server).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from thrifty.bench import engine_run
from thrifty.bench.stats import hardware_info, now_iso, percentile
from thrifty.bench.workload import random_requests, token_high
from thrifty.errors import InvalidRequestError


@dataclass(slots=True)
class FairnessConfig:
    model: str
    long: int = 12_000
    short: int = 4
    short_output: int = 4
    short_every_s: float = 1.0
    streams: int = 2
    slowdowns: tuple[float, ...] = (2.0,)
    seed: int = 0
    dtype: str = "auto"
    weights: str = "auto"
    lm_head: str = "auto"                  # the output head's format (thrifty.models.lm_head)
    device: str | None = None
    kv_cache_memory: float = 1.0
    max_num_batched_tokens: int = 2048
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.long < 2 or self.short < 1 or self.streams < 1 or self.short_every_s <= 0:
            raise InvalidRequestError("--long >= 2, --short >= 1, --streams >= 1 and --short-every > 0 are needed",
                                      "", param="long")


def run_fairness(cfg: FairnessConfig) -> dict:
    from thrifty.models.loader import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"loading {cfg.model} ...", file=sys.stderr, flush=True)
    loaded = load(cfg.model, cfg.dtype, cfg.device, weights=cfg.weights, lm_head=cfg.lm_head)
    high = token_high(min(loaded.config.vocab_size, loaded.tokenizer.vocab_size), loaded.tokenizer.stop_token_ids)
    if cfg.long + 8 > loaded.config.max_position_embeddings:
        raise InvalidRequestError(f"--long {cfg.long} exceeds the model's context", "", param="long")
    long_prompt = random_requests(1, cfg.long, 1, high, cfg.seed)[0].prompt_ids
    stream_prompts = [r.prompt_ids for r in random_requests(cfg.streams, 32, 1, high, cfg.seed + 1)]
    short_prompts = [r.prompt_ids for r in random_requests(256, cfg.short, 1, high, cfg.seed + 2)]
    engine_run.warm_up(loaded, _options(cfg, None), stream_prompts[0])
    modes = [None, *cfg.slowdowns]
    results = [_run_mode(loaded, cfg, slowdown, long_prompt, stream_prompts, short_prompts)
               for slowdown in tqdm(modes, desc="bench fairness", unit="mode", disable=not cfg.progress)]
    return {"benchmark": "fairness", "date": now_iso(),
            "model": {"spec": cfg.model, "name": loaded.config.name, "weights": loaded.weights,
                      "dtype": str(loaded.dtype).removeprefix("torch.")},
            "hardware": hardware_info(), "config": asdict(cfg), "results": results}


def _options(cfg: FairnessConfig, slowdown: float | None) -> dict:
    opts = {"dtype": cfg.dtype, "kv_cache_memory": cfg.kv_cache_memory, "max_decode_slowdown": slowdown,
            "max_num_batched_tokens": cfg.max_num_batched_tokens, "max_num_seqs": 64}
    if cfg.threads:
        opts["num_threads"] = cfg.threads
    return opts


def _run_mode(loaded, cfg: FairnessConfig, slowdown: float | None, long_prompt: list[int],
              stream_prompts: list[list[int]], short_prompts: list[list[int]]) -> dict:
    unloaded = _stream_gaps(engine_run.make_engine(loaded, **_options(cfg, slowdown)), stream_prompts, steps=24)
    engine = engine_run.make_engine(loaded, **_options(cfg, slowdown))
    for i, p in enumerate(stream_prompts):
        engine.add_request(p, engine_run.greedy_exact(1 << 20), f"stream-{i}")
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()                                    # the streams are decoding
    engine.add_request(long_prompt, engine_run.greedy_exact(1), "long")
    start = next_short = time.monotonic()
    last_token = {f"stream-{i}": start for i in range(len(stream_prompts))}
    gaps: list[float] = []
    shorts: dict[str, float | None] = {}
    long_ttft = None
    with tqdm(total=len(long_prompt), desc=f"slowdown {slowdown}", unit="tok", disable=not cfg.progress,
              leave=False) as bar:
        while long_ttft is None:
            now = time.monotonic()
            if now >= next_short and len(shorts) < len(short_prompts):
                rid = f"short-{len(shorts)}"
                engine.add_request(short_prompts[len(shorts)], engine_run.greedy_exact(cfg.short_output), rid)
                shorts[rid] = None
                next_short += cfg.short_every_s
            before = _long_done(engine)
            outputs = engine.step()
            bar.update(_long_done(engine) - before)
            now = time.monotonic()
            for out in outputs:
                if out.request_id in last_token:
                    gaps.append(now - last_token[out.request_id])
                    last_token[out.request_id] = now
                elif out.request_id == "long":
                    long_ttft = out.usage.time_to_first_token_s
            _record_first_tokens(outputs, shorts)
    answered_before_long = sum(t is not None for t in shorts.values())
    while None in shorts.values():                       # every short counts, also one the long prompt held up
        _record_first_tokens(engine.step(), shorts)
    for rid in last_token:
        engine.abort(rid)
    ttfts = list(shorts.values())
    tpot_p99 = percentile(gaps, 99)
    return {"max_decode_slowdown": slowdown, "unloaded_tpot_p50_s": percentile(unloaded, 50),
            "unloaded_tpot_p99_s": percentile(unloaded, 99), "loaded_tpot_p50_s": percentile(gaps, 50),
            "loaded_tpot_p99_s": tpot_p99, "tpot_p99_over_unloaded": tpot_p99 / percentile(unloaded, 50),
            "short_requests": len(shorts), "short_answered_before_long": answered_before_long,
            "short_ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
            "short_ttft_p99_s": percentile(ttfts, 99) if ttfts else None, "long_ttft_s": long_ttft,
            "stream_tokens_during_prefill": len(gaps)}


def _record_first_tokens(outputs, shorts: dict[str, float | None]) -> None:
    for out in outputs:
        if shorts.get(out.request_id, 0.0) is None:
            shorts[out.request_id] = out.usage.time_to_first_token_s


def _long_done(engine) -> int:
    seq = next((s for s in engine.scheduler.running if s.request_id == "long"), None)
    return seq.num_computed_tokens if seq is not None else 0


def _stream_gaps(engine, prompts: list[list[int]], steps: int) -> list[float]:
    """Inter-token times of `prompts` decoding alone (after their prefill)."""
    for i, p in enumerate(prompts):
        engine.add_request(p, engine_run.greedy_exact(steps + 1), f"alone-{i}")
    engine.step()
    gaps, last = [], time.monotonic()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.monotonic()
        gaps += [now - last] * len(outputs)
        last = now
    return gaps


def format_report(report: dict) -> str:
    from thrifty.bench.report import markdown_table

    c, m, h = report["config"], report["model"], report["hardware"]
    rows = [["off (full chunks)" if r["max_decode_slowdown"] is None else f"{r['max_decode_slowdown']:g}x",
             r["unloaded_tpot_p50_s"], r["unloaded_tpot_p99_s"], r["loaded_tpot_p50_s"], r["loaded_tpot_p99_s"],
             r["tpot_p99_over_unloaded"],
             f"{r['short_answered_before_long']}/{r['short_requests']}", r["short_ttft_p50_s"], r["short_ttft_p99_s"],
             r["long_ttft_s"]] for r in report["results"]]
    return "\n".join([
        f"## fairness: {m['name']} ({m['weights']}), a {c['long']}-token prompt beside {c['streams']} decoding "
        f"streams and a {c['short']}-token request every {c['short_every_s']:g} s",
        f"{h['cpu']}, {h['cores']} cores, {h['torch_threads']} torch threads, torch {h['torch_version']}; "
        f"{report['date']}", "",
        markdown_table(["prefill budget", "TPOT alone p50 s", "p99 s", "TPOT during prefill p50 s", "p99 s",
                        "p99 / alone p50",
                        "shorts answered", "short TTFT p50 s", "short TTFT p99 s", "long prompt TTFT s"], rows)])
