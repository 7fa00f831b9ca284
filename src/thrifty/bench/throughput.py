"""`thrifty bench throughput`: thrifty's scheduler policies and the peers over a list of concurrencies.

Every engine gets the same requests (random prompt ids of exactly prompt_len tokens, exactly output_len new
tokens or a seeded draw from a range, greedy with EOS ignored) in the same closed loop: at concurrency C,
`requests` requests in total (default 2 C, at least C) with at most C in flight.
"""
from __future__ import annotations

import gc
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch

from thrifty.bench import engine_run, hf_peer
from thrifty.bench.stats import RunResult, hardware_info, now_iso
from thrifty.bench.workload import random_requests, token_high
from thrifty.engine.scheduler import POLICIES
from thrifty.errors import InvalidRequestError

PEERS = ("hf", "llamacpp")


@dataclass(slots=True)
class ThroughputConfig:
    model: str
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    prompt_len: int = 128
    output_len: int = 128
    output_len_range: tuple[int, int] | None = None
    policies: list[str] = field(default_factory=lambda: ["continuous"])
    peers: list[str] = field(default_factory=list)
    requests: int | None = None           # per concurrency level; default 2 x concurrency
    repeats: int = 1                      # thrifty runs per (policy, concurrency), policies interleaved; medians
    seed: int = 0
    dtype: str = "auto"
    kv_cache_memory: float = 1.0
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    threads: int | None = None
    weights: str = "auto"                 # weight format (thrifty.models.weight_spec)
    lm_head: str = "auto"                 # the output head's format (thrifty.models.lm_head)
    device: str | None = None             # auto / cpu / cuda
    hf_requests: int = 4                  # requests the HF peer actually times (the rest are extrapolated)
    hf_dtype: str = "bfloat16"
    warmup: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise InvalidRequestError("concurrency levels must be >= 1", "e.g. --concurrency 1,8,32",
                                      param="concurrency")
        if self.prompt_len < 1 or self.output_len < 1:
            raise InvalidRequestError("prompt and output lengths must be >= 1", "", param="prompt_len")
        for p in self.policies:
            if p not in POLICIES:
                raise InvalidRequestError(f"unknown policy '{p}'", f"use {', '.join(POLICIES)}", param="policies")
        for p in self.peers:
            if p not in PEERS:
                raise InvalidRequestError(f"unknown peer '{p}'", f"use {', '.join(PEERS)}", param="peers")
        if self.requests is not None and self.requests < 1:
            raise InvalidRequestError("--requests must be >= 1", "", param="requests")
        if self.repeats < 1:
            raise InvalidRequestError("--repeats must be >= 1", "", param="repeats")
        if self.hf_requests < 1:
            raise InvalidRequestError("--hf-requests must be >= 1", "", param="hf_requests")

    def num_requests(self, concurrency: int) -> int:
        return max(self.requests, concurrency) if self.requests else 2 * concurrency

    @property
    def output_spec(self) -> int | tuple[int, int]:
        return self.output_len_range or self.output_len

    def engine_options(self) -> dict:
        opts = {"dtype": self.dtype, "kv_cache_memory": self.kv_cache_memory, "block_size": self.block_size,
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_model_len": self.max_model_len}
        if self.threads:
            opts["num_threads"] = self.threads
        return opts


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_throughput(cfg: ThroughputConfig) -> dict:
    from thrifty.models.loader import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log(f"loading {cfg.model} ...")
    loaded = load(cfg.model, cfg.dtype, cfg.device, weights=cfg.weights, lm_head=cfg.lm_head)
    high = token_high(min(loaded.config.vocab_size, loaded.tokenizer.vocab_size), loaded.tokenizer.stop_token_ids)
    longest = cfg.prompt_len + (cfg.output_len_range[1] if cfg.output_len_range else cfg.output_len)
    context = cfg.max_model_len or loaded.config.max_position_embeddings
    if longest > context:
        raise InvalidRequestError(f"prompt plus output ({longest} tokens) exceed the model's context ({context})",
                                  "shorten --prompt-len / --output-len", param="prompt_len")
    all_requests = random_requests(max(cfg.num_requests(c) for c in cfg.concurrency), cfg.prompt_len,
                                   cfg.output_spec, high, cfg.seed)
    options = cfg.engine_options()
    results: list[RunResult] = []
    if cfg.warmup:
        engine_run.warm_up(loaded, options, all_requests[0].prompt_ids)
    for rep in range(cfg.repeats):
        # alternate the policy order each repeat, so a machine that slows down or speeds up mid-run does not
        # favour whichever policy runs first; the ratios use each policy's median
        for policy in cfg.policies if rep % 2 == 0 else cfg.policies[::-1]:
            for c in cfg.concurrency:
                r = engine_run.bench_engine(loaded, all_requests[:cfg.num_requests(c)], c, policy, options,
                                            cfg.progress)
                r.extra["repeat"] = rep
                log(f"thrifty {policy} c={c} (run {rep + 1}/{cfg.repeats}): {r.output_tokens_per_s:.1f} output tok/s")
                results.append(r)
    model_info = {"spec": cfg.model, "name": loaded.config.name, "path": str(loaded.path), "architecture": loaded.config.architecture,
                  "layers": loaded.config.num_layers, "hidden_size": loaded.config.hidden_size,
                  "dtype": str(loaded.dtype).removeprefix("torch."), "weights": cfg.weights, "lm_head": loaded.lm_head,
                  "device": str(loaded.device)}
    del loaded
    gc.collect()
    if "hf" in cfg.peers:
        results += _run_hf(cfg, model_info["path"], all_requests)
    if "llamacpp" in cfg.peers:
        from thrifty.bench import llamacpp_peer

        results += llamacpp_peer.run(model_info["path"], all_requests, cfg.concurrency, cfg.num_requests,
                                     threads=cfg.threads or torch.get_num_threads(), progress=cfg.progress,
                                     log=log)
    rows = [r.to_dict() for r in results]
    config = asdict(cfg) | {"requests_per_concurrency": {str(c): cfg.num_requests(c) for c in cfg.concurrency},
                            "arrival": "closed loop: at most `concurrency` requests in flight, the next one is "
                                       "added as soon as one finishes, until `requests` have run"}
    return {"benchmark": "throughput", "date": now_iso(), "model": model_info, "hardware": hardware_info(),
            "config": config, "results": rows, "ratios": ratios(rows)}


def _run_hf(cfg: ThroughputConfig, path: str, all_requests) -> list[RunResult]:
    from pathlib import Path

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.hf_dtype]
    log("loading the transformers peer ...")
    model = hf_peer.load_hf_model(Path(path), dtype)
    hf_peer.generate_one(model, all_requests[0].prompt_ids, 2)        # warm-up
    timed = min(cfg.hf_requests, len(all_requests))
    timings = hf_peer.measure(model, all_requests[:timed], cfg.progress)
    del model
    gc.collect()
    out = []
    for c in cfg.concurrency:
        n = cfg.num_requests(c)
        r = hf_peer.serial_result(timings[:n], n, c, cfg.hf_dtype)
        log(f"hf c={c}: {r.output_tokens_per_s:.1f} output tok/s")
        out.append(r)
    return out


# ---- ratios against the targets -------------------------------------------------------------------
TARGET_SCALING = {(8, 1): 5.0, (32, 1): 10.0}
TARGET_PEER = {"hf": 10.0, "llamacpp": 1.5}
TARGET_POLICY = {"static": 1.5}
KV_WASTE_TARGET = 0.04


def ratios(rows: list[dict]) -> list[dict]:
    """Throughput ratios (and the kv_waste check) the issue asks for, each with its target where it has one."""
    def tput(engine: str, policy: str | None, c: int) -> float | None:
        """The median over repeated runs (one run: its value)."""
        values = [r["output_tokens_per_s"] for r in rows
                  if r["engine"] == engine and (policy is None or r["policy"] == policy) and r["concurrency"] == c]
        return statistics.median(values) if values else None

    def entry(name: str, num: float | None, den: float | None, target: float | None) -> dict | None:
        if not num or not den:
            return None
        value = num / den
        return {"name": name, "value": value, "target": f">= {target:g}" if target else None,
                "met": value >= target if target else None}

    mine = [r for r in rows if r["engine"] == "thrifty"]
    if not mine:
        return []
    policies = list(dict.fromkeys(r["policy"] for r in mine))
    base = "continuous" if "continuous" in policies else policies[0]
    cs = sorted({r["concurrency"] for r in mine if r["policy"] == base})
    c0, cmax = cs[0], cs[-1]
    out = [entry(f"thrifty {base}: c={c} / c={c0}", tput("thrifty", base, c), tput("thrifty", base, c0),
                 TARGET_SCALING.get((c, c0))) for c in cs[1:]]
    out += [entry(f"thrifty {base} / {p} at c={cmax}", tput("thrifty", base, cmax), tput("thrifty", p, cmax),
                  TARGET_POLICY.get(p) if cmax == 32 else None) for p in policies if p != base]
    for peer in dict.fromkeys(r["engine"] for r in rows if r["engine"] != "thrifty"):
        out.append(entry(f"thrifty {base} / {peer} at c={cmax}", tput("thrifty", base, cmax),
                         tput(peer, None, cmax), TARGET_PEER.get(peer) if cmax == 32 else None))
    seen: set[int] = set()
    for r in mine:  # once per concurrency (repeats measure the same workload's waste)
        if r["policy"] == base and r["kv_waste"] is not None and r["concurrency"] not in seen:
            seen.add(r["concurrency"])
            out.append({"name": f"kv_waste, thrifty {base} c={r['concurrency']}", "value": r["kv_waste"],
                        "target": f"< {KV_WASTE_TARGET:g}", "met": r["kv_waste"] < KV_WASTE_TARGET})
    return [e for e in out if e is not None]


def format_report(report: dict) -> str:
    from thrifty.bench.report import markdown_table

    headers = ["engine", "policy", "conc", "run", "reqs", "out tok/s", "req/s", "TTFT p50 s", "TTFT p99 s",
               "TPOT p50 s", "TPOT p99 s", "kv_waste", "kv_waste contiguous"]
    rows = [[r["engine"], r["policy"], r["concurrency"], r["extra"].get("repeat", 0) + 1, r["requests"],
             r["output_tokens_per_s"], r["requests_per_s"], r["ttft_p50_s"], r["ttft_p99_s"], r["tpot_p50_s"],
             r["tpot_p99_s"], r["kv_waste"], r["kv_waste_contiguous"]] for r in report["results"]]
    c, m, h = report["config"], report["model"], report["hardware"]
    out_len = f"{c['output_len_range'][0]}-{c['output_len_range'][1]} (mixed)" if c["output_len_range"] \
        else str(c["output_len"])
    parts = [f"## throughput: {m['name']} ({m['dtype']}), prompt {c['prompt_len']}, output {out_len}",
             f"{h['cpu']}, {h['cores']} cores, {h['torch_threads']} torch threads, torch {h['torch_version']}; "
             f"{report['date']}", "", markdown_table(headers, rows)]
    ctx = sorted({r["extra"].get("max_model_len") for r in report["results"] if r["extra"].get("max_model_len")})
    if ctx:
        parts.append(f"\nkv_waste contiguous: what reserving max_model_len ({', '.join(map(str, ctx))}) slots per "
                     f"running request would waste, from the same run's used slots.")
    if report["ratios"]:
        parts += ["", markdown_table(["ratio", "value", "target", "met"],
                                     [[e["name"], e["value"], e["target"], e["met"]] for e in report["ratios"]])]
    notes = [f"- {r['engine']} c={r['concurrency']}: {n}" for r in report["results"] for n in r["notes"]]
    if notes:
        parts += ["", "notes:", *notes]
    return "\n".join(parts)
