"""`thrifty bench kv`: KV cache storage formats side by side in one run, with llama.cpp's KV types as rows.

Per kv_cache_dtype: KV bytes per token (from the cache spec, scales included) and the sequences of each context
length a fixed KV budget holds; perplexity and mean KL against the bf16 KV on the held-out eval text (bench/ppl.py,
every attention read through the format), once through the prefill attention and once with every position
attending through the decode kernel (the int8 integer dot, for one, runs only there); greedy agreement with the
bf16 KV on HumanEval chat prompts; decode tok/s at each context length at a fixed batch.

Decode at context C, batch B: one real C-token prompt (held-out code) is prefilled once with a bf16 KV, its K/V
written into B distinct block ranges of a cache in each format (quantized on the write, as the engine does), then
timed decode steps of B one-token rows run the model's forward, the output head and argmax over those B contexts
(the runner's work of a decode step; the scheduler's and detokenizer's bookkeeping is not counted). Prefilling B
distinct C-token prompts would cost minutes per format on 2 cores at C = 8192 and measures nothing more: the
decode step reads B separate copies either way. llama.cpp does the same (one prefill, copied to B per-sequence
KV streams, timed llama_decode calls + argmax) with K/V in f16 and q8_0.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from thrifty.bench.report import fmt, markdown_table
from thrifty.bench.stats import hardware_info, now_iso
from thrifty.engine import kv_calibration
from thrifty.engine.kv_cache import KV_CACHE_DTYPES, KVCacheSpec, PagedKVCache, check_kv_cache_dtype
from thrifty.errors import InvalidRequestError
from thrifty.ops.attention_metadata import AttentionMetadata
from thrifty.ops.forward_context import set_forward_context

BLOCK = 16
REFERENCE = "bfloat16"


@dataclass(slots=True)
class KVBenchConfig:
    model: str
    kv_dtypes: list[str] = field(default_factory=lambda: ["bfloat16", "int8", "fp8_e4m3"])
    context: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    batch: int = 8
    steps: int = 16                       # timed decode steps per (format, context)
    kv_budget_gib: float = 1.0            # the budget "sequences that fit" is counted in
    max_eval_tokens: int = 2048
    seq_len: int = 512
    greedy_prompts: int = 20
    greedy_tokens: int = 64
    llamacpp: list[str] = field(default_factory=lambda: ["f16", "q8_0"])   # llama.cpp KV types; empty: no peer
    weights: str = "auto"
    threads: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        for name in self.kv_dtypes:
            check_kv_cache_dtype(name)
        if REFERENCE not in self.kv_dtypes:
            self.kv_dtypes = [REFERENCE, *self.kv_dtypes]    # the reference perplexity, KL and greedy compare to
        self.kv_dtypes = [REFERENCE, *[d for d in self.kv_dtypes if d != REFERENCE]]
        unknown = sorted(set(self.llamacpp) - {"f16", "q8_0"})
        if unknown:
            raise InvalidRequestError(f"unknown llama.cpp KV type(s): {', '.join(unknown)}", "use f16, q8_0",
                                      param="llamacpp")
        if self.batch < 1 or self.steps < 1 or not self.context or min(self.context) < 2:
            raise InvalidRequestError("--batch and --steps must be >= 1, contexts >= 2", "", param="batch")


# ---- sizes ----------------------------------------------------------------------------------------------
def _sizes(config, kv_dtype: torch.dtype, budget_gib: float, contexts: list[int]) -> dict:
    spec = KVCacheSpec.from_budget(config, budget_gib, BLOCK, kv_dtype)
    return {"kv_bytes_per_token": spec.bytes_per_block // BLOCK, "budget_blocks": spec.num_blocks,
            "sequences_in_budget": {str(c): spec.num_blocks // -(-c // BLOCK) for c in contexts}}


# ---- quality --------------------------------------------------------------------------------------------
def _greedy(loaded, prompts: list[list[int]], tokens: int, kv_dtype: str) -> list[list[int]]:
    from thrifty.bench.engine_run import greedy_exact, make_engine

    engine = make_engine(loaded, max_num_seqs=len(prompts), kv_cache_memory=0.5, max_num_batched_tokens=8192,
                         kv_cache_dtype=kv_dtype)
    return [out.token_ids for out in engine.run(prompts, [greedy_exact(tokens)] * len(prompts))]


# ---- decode speed ---------------------------------------------------------------------------------------
@torch.inference_mode()
def _prefill_context(loaded, ids: list[int]):
    """One real prefill of `ids` with a bf16 KV: (its layers' caches, the slots it filled, the next token)."""
    from thrifty.quantizers.prefill import prefill_meta

    device = loaded.device
    meta = prefill_meta(loaded.config, [len(ids)], torch.bfloat16, device)
    with set_forward_context(meta):
        hidden = loaded.model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device))
    first = int(loaded.model.compute_logits(hidden[-1:]).argmax(-1))
    return meta.kv_caches, meta.slot_mapping, first


@torch.inference_mode()
def _decode_speed(loaded, source, context: int, batch: int, steps: int, kv_dtype: str,
                  k_transform: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Timed decode steps of `batch` rows, each over its own copy of the prefilled context in `kv_dtype`."""
    layers, slots, first = source
    cfg, device = loaded.config, loaded.device
    per_seq = -(-(context + steps + 4) // BLOCK)
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, BLOCK, per_seq * batch,
                       KV_CACHE_DTYPES[kv_dtype])
    cache = PagedKVCache(spec, device, k_transform)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    for src, dst in zip(layers, cache.layers):
        k, v = (t.transpose(0, 1) for t in src.read(slots, torch.float32))     # [C, Hkv, D]
        for table in tables:
            blocks = torch.tensor(table, device=device)
            dst.write(k, v, (blocks[:, None] * BLOCK + torch.arange(BLOCK, device=device)).flatten()[:context])
    tokens = [first] * batch
    times = []
    for step in range(steps + 2):                         # two warm-up steps
        start = time.perf_counter()
        meta = AttentionMetadata.build(tables, [context + step + 1] * batch, [1] * batch, BLOCK, cache.layers, device)
        with set_forward_context(meta):
            hidden = loaded.model(torch.tensor(tokens, device=device),
                                  torch.full((batch,), context + step, device=device))
        tokens = loaded.model.compute_logits(hidden).argmax(-1).tolist()
        times.append(time.perf_counter() - start)
    timed = sum(times[2:])
    return {"engine": f"thrifty {kv_dtype}", "kv_dtype": kv_dtype, "context": context, "batch": batch,
            "steps": steps, "decode_tok_s": batch * steps / timed, "ms_per_step": 1000 * timed / steps}


def _context_ids(tokenizer, n: int) -> list[int]:
    from thrifty.bench.quant import _text_ids

    ids = _text_ids(tokenizer, n)
    while len(ids) < n:                                   # the held-out text is shorter than the longest context
        ids = ids + ids
    return ids[:n]


# ---- the run --------------------------------------------------------------------------------------------
def run_kv(cfg: KVBenchConfig) -> dict:
    from thrifty.bench.ppl import EvalSet, score
    from thrifty.bench.quant import prompt_sets
    from thrifty.models import zoo
    from thrifty.models.loader import load
    from thrifty.quantizers import data

    torch.set_num_threads(cfg.threads)
    path = zoo.resolve(cfg.model)
    loaded = load(path, weights=cfg.weights)
    tok = loaded.tokenizer
    evalset = EvalSet.build(tok, cfg.max_eval_tokens, cfg.seq_len)
    decode_evalset = EvalSet(evalset.windows)     # the same text, its own bf16 reference
    prompts = prompt_sets(tok, _context_ids(tok, 64), 0, cfg.greedy_prompts)["chat"]
    rows, greedy_ref = [], None
    for name in tqdm(cfg.kv_dtypes, desc="bench kv: quality", unit="format", disable=not cfg.progress):
        dtype = KV_CACHE_DTYPES[name]
        scores = score(loaded, evalset, keep_as_reference=name == REFERENCE, progress=cfg.progress, label=name,
                       kv_dtype=dtype)
        decode_scores = score(loaded, decode_evalset, keep_as_reference=name == REFERENCE, progress=cfg.progress,
                              label=f"{name} (decode attention)", kv_dtype=dtype, as_decodes=True)
        outs = _greedy(loaded, prompts, cfg.greedy_tokens, name)
        greedy_ref = greedy_ref or outs
        rows.append({"kv_dtype": name, **_sizes(loaded.config, dtype, cfg.kv_budget_gib, cfg.context),
                     **{k: scores[k] for k in ("ppl", "ppl_code", "ppl_prose", "kl_vs_bf16")},
                     "ppl_decode_attn": decode_scores["ppl"], "kl_decode_attn_vs_bf16": decode_scores["kl_vs_bf16"],
                     "greedy_identical": sum(a == b for a, b in zip(outs, greedy_ref)), "greedy_prompts": len(outs)})
    ref = rows[0]
    for row in rows:
        row["bytes_vs_bf16"] = row["kv_bytes_per_token"] / ref["kv_bytes_per_token"]
        row["ppl_vs_bf16"] = row["ppl"] / ref["ppl"] - 1
        row["ppl_decode_attn_vs_bf16"] = row["ppl_decode_attn"] / ref["ppl_decode_attn"] - 1

    ids = _context_ids(tok, max(cfg.context))
    k_transform = kv_calibration.calibrate(loaded)
    decode = []
    for context in tqdm(cfg.context, desc="bench kv: decode", unit="context", disable=not cfg.progress):
        start = time.monotonic()
        source = _prefill_context(loaded, ids[:context])
        prefill_s = time.monotonic() - start
        for name in cfg.kv_dtypes:
            decode.append({**_decode_speed(loaded, source, context, cfg.batch, cfg.steps, name, k_transform),
                           "prefill_s": prefill_s})
        del source
    if cfg.llamacpp:
        from thrifty.bench.llamacpp_peer import decode_at_context

        for kv_type in cfg.llamacpp:
            decode += decode_at_context(str(path), ids, cfg.context, cfg.batch, cfg.steps, kv_type, cfg.threads,
                                        cfg.progress)
    report = {"benchmark": "kv", "date": now_iso(), "model": cfg.model, "weights": loaded.weights,
              "hardware": hardware_info(), "config": asdict(cfg), "data": data.describe(), "rows": rows,
              "decode": decode}
    report["targets"] = targets(report)
    return report


# ---- targets and tables ---------------------------------------------------------------------------------
def _tok_s(report: dict, engine: str, context: int) -> float | None:
    return next((d["decode_tok_s"] for d in report["decode"] if d["engine"] == engine and d["context"] == context),
                None)


def targets(report: dict) -> list[dict]:
    """Issue 16's targets, each with what was measured and whether it is met (None: not measured in this run)."""
    rows = {r["kv_dtype"]: r for r in report["rows"]}
    contexts = sorted({d["context"] for d in report["decode"]})
    out = []

    def check(name: str, value, met) -> None:
        out.append({"target": name, "measured": value, "met": met})

    for fmt_name, limit in (("int8", 0.003), ("fp8_e4m3", 0.01)):
        if fmt_name in rows:
            for key, path in (("ppl_vs_bf16", ""), ("ppl_decode_attn_vs_bf16", ", decode attention")):
                v = rows[fmt_name][key]
                check(f"{fmt_name} ppl within +{limit:.1%} of bf16 KV{path}", f"{v:+.3%}", v <= limit)
    for name, r in rows.items():
        if name != REFERENCE:
            check(f"{name} greedy identical >= 18/20", f"{r['greedy_identical']}/{r['greedy_prompts']}",
                  r["greedy_identical"] >= 0.9 * r["greedy_prompts"])
            check(f"{name} KV bytes/token <= 0.53x bf16", f"{r['bytes_vs_bf16']:.3f}x", r["bytes_vs_bf16"] <= 0.53)
    if contexts and "int8" in rows:
        hi, lo = max(contexts), min(contexts)
        ratio = _ratio(_tok_s(report, "thrifty int8", hi), _tok_s(report, "thrifty bfloat16", hi))
        check(f"int8 decode >= 1.3x bf16 at {hi} ctx", ratio and f"{ratio:.2f}x", ratio and ratio >= 1.3)
        ratio = _ratio(_tok_s(report, "thrifty int8", lo), _tok_s(report, "thrifty bfloat16", lo))
        check(f"int8 decode not slower than bf16 at {lo} ctx", ratio and f"{ratio:.2f}x", ratio and ratio >= 1.0)
        for c in (2048, 8192):
            ratio = _ratio(_tok_s(report, "thrifty int8", c), _tok_s(report, "llama.cpp q8_0", c))
            if ratio is not None:
                check(f"int8 decode ahead of llama.cpp q8_0 at {c} ctx", f"{ratio:.2f}x", ratio > 1.0)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def format_report(report: dict) -> str:
    cfg = report["config"]
    contexts = cfg["context"]
    head = ["kv dtype", "bytes/token", "x bf16", *[f"seqs of {c} in {cfg['kv_budget_gib']:g} GiB" for c in contexts],
            "ppl", "ppl vs bf16", "KL vs bf16", "decode-attn ppl vs bf16", "decode-attn KL",
            f"greedy = bf16 ({cfg['greedy_tokens']} tok)"]
    body = [[r["kv_dtype"], r["kv_bytes_per_token"], f"{r['bytes_vs_bf16']:.3f}",
             *[r["sequences_in_budget"][str(c)] for c in contexts], fmt(r["ppl"], 4), f"{r['ppl_vs_bf16']:+.3%}",
             fmt(r["kl_vs_bf16"]), f"{r['ppl_decode_attn_vs_bf16']:+.3%}", fmt(r["kl_decode_attn_vs_bf16"]),
             f"{r['greedy_identical']}/{r['greedy_prompts']}"] for r in report["rows"]]
    engines = list(dict.fromkeys(d["engine"] for d in report["decode"]))
    speed = [[e, *[fmt(_tok_s(report, e, c)) for c in contexts]] for e in engines]
    goals = [[t["target"], t["measured"], {True: "met", False: "NOT met", None: "not measured"}[t["met"]]]
             for t in report["targets"]]
    return (f"## KV cache formats ({report['model']}, weights {report['weights']}, "
            f"{report['hardware'].get('cpu', '')}, {cfg['threads']} threads)\n\n" + markdown_table(head, body)
            + "\n\nppl / KL: the held-out text scored in one pass, attention through the prefill kernel; "
              "decode-attn: the same text with every position attending through the decode kernel, the path "
              "generated tokens take"
            + f"\n\n### decode tok/s, batch {cfg['batch']}, by context length\n\n"
            + "forward + output head + argmax of one decode step over batch distinct contexts (one real prefill, "
              f"its KV copied per sequence), the mean over {cfg['steps']} steps after 2 warm-up steps\n\n"
            + markdown_table(["engine", *[f"{c} ctx" for c in contexts]], speed)
            + "\n\n### targets (issue 16)\n\n" + markdown_table(["target", "measured", ""], goals))


# ---- command line ---------------------------------------------------------------------------------------
def add_parser(bsub: argparse._SubParsersAction) -> None:
    k = bsub.add_parser("kv", help="KV cache formats: bytes, sequences per budget, ppl / KL vs bf16 KV, greedy "
                                   "agreement, decode tok/s by context, beside llama.cpp's f16 / q8_0 KV")
    k.add_argument("--model", required=True, help="zoo name or .gguf file")
    k.add_argument("--kv-dtypes", default="bfloat16,int8,fp8_e4m3",
                   help="comma-separated kv_cache_dtype values (bfloat16 always runs: the reference)")
    k.add_argument("--context", default="512,2048,8192", help="context lengths for decode tok/s")
    k.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    k.add_argument("--steps", type=int, default=16, help="timed decode steps per format and context")
    k.add_argument("--kv-budget", type=float, default=1.0, help="GiB the 'sequences that fit' column counts in")
    k.add_argument("--max-eval-tokens", type=int, default=2048)
    k.add_argument("--seq-len", type=int, default=512)
    k.add_argument("--greedy-prompts", type=int, default=20)
    k.add_argument("--greedy-tokens", type=int, default=64)
    k.add_argument("--llamacpp", default="f16,q8_0", help="llama.cpp KV types to run beside (empty: none)")
    k.add_argument("--weights", default="auto")
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    k.add_argument("--no-progress", dest="progress", action="store_false")


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> dict:
    from thrifty.bench.report import write_json

    cfg = KVBenchConfig(model=args.model, kv_dtypes=_csv(args.kv_dtypes), context=[int(c) for c in _csv(args.context)],
                        batch=args.batch, steps=args.steps, kv_budget_gib=args.kv_budget,
                        max_eval_tokens=args.max_eval_tokens, seq_len=args.seq_len, greedy_prompts=args.greedy_prompts,
                        greedy_tokens=args.greedy_tokens, llamacpp=_csv(args.llamacpp), weights=args.weights,
                        threads=args.threads, progress=args.progress)
    report = run_kv(cfg)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return report
