"""`thrifty report claims`: run the benchmarks that measure the seed's claims within a time budget and write one
report (self-contained HTML with the plots inline, markdown, JSON): per claim the seed's number, thrifty's, the
peer's, the hardware, the command that reproduces it, and met / not met, or why it was not measured here.

A skeleton: each claim is a short run of an existing `thrifty bench` command (a subprocess, so one claim's
crash or memory is not the next one's) and a reader that takes the number out of its JSON. Claims whose
benchmark does not exist yet, or that do not fit the budget, are listed with the reason.
"""
from __future__ import annotations

import base64
import html
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from thrifty.bench.stats import hardware_info, now_iso
from thrifty.reporting import fmt, markdown_table

MODEL = "qwen2.5-coder-0.5b-instruct"
USD_PER_HOUR = 0.10          # router.machine_usd_per_hour's default: the machine's price for the cost headline
CACHED_INPUT_FRACTION = 0.1  # router.cached_input_fraction's default: a prefix-cache hit token's share of the price
CLOUD_USD_PER_1M_OUT = 0.60  # the README's remote tier (cloud) output price: what a cache hit saves per token

# report -> (thrifty's number, the peer's, met, the cost headline: $ per 1M output tokens saved)
Reading = tuple[str, str | None, bool | None, str | None]
Reader = Callable[[dict], Reading]


@dataclass(slots=True, frozen=True)
class Claim:
    key: str
    claim: str                   # what the seed or its issue says, in words
    seed: str                    # the number it gives
    argv: tuple[str, ...] = ()   # after `thrifty`; empty: no benchmark measures it here
    minutes: float = 0.0         # expected minutes on 2 cores
    read: Reader | None = None
    plot: bool = False
    reason: str = ""             # why it is not measured, when argv is empty


@dataclass(slots=True)
class Outcome:
    key: str
    claim: str
    seed: str
    command: str
    thrifty: str | None = None
    peer: str | None = None
    met: bool | None = None
    usd: str | None = None       # the cost headline of this technique
    status: str = "not run"
    seconds: float | None = None
    plot_png: str | None = None  # base64, for the HTML page
    notes: list[str] = field(default_factory=list)


def usd_per_1m(tokens_per_s: float, usd_per_hour: float = USD_PER_HOUR) -> float:
    """What 1M tokens cost on a machine billed `usd_per_hour` that computes `tokens_per_s` (the ledger's auto
    price: costs.auto_price)."""
    return usd_per_hour / 3600.0 / tokens_per_s * 1e6


def saving(off_tok_s: float, on_tok_s: float, what: str = "output") -> str:
    """The cost headline of a technique that moves throughput from `off_tok_s` to `on_tok_s`."""
    off, on = usd_per_1m(off_tok_s), usd_per_1m(on_tok_s)
    return f"${off - on:+.3f} saved per 1M {what} tokens (${off:.3f} -> ${on:.3f} at ${USD_PER_HOUR:g}/h)"


SERVED = "thrifty+gguf+no-prefill-budget"    # the thrifty the serving claim compares
BUDGETED = "thrifty+gguf"                    # the same with chunked prefill's decode budget (the default)
PEER = "llama-server"


def _rows(r: dict, target: str) -> list[dict]:
    return sorted((x for x in r["results"] if x["target"] == target), key=lambda x: x["request_rate"])


def _serve(r: dict) -> Reading:
    comp = sorted((x for x in r["comparison"] if x["target"] == SERVED), key=lambda x: x["request_rate"])
    top = comp[-1]
    lower = all(x["ttft_p99_lower"] for x in comp)
    ratio = top.get("goodput_ratio")
    rates = "/".join(fmt(x["request_rate"]) for x in comp)
    return (f"TTFT p99 {' / '.join(fmt(x['ttft_p99_ms'], 0) for x in comp)} ms at {rates} req/s; goodput "
            f"{fmt(top['goodput'])} req/s at the highest",
            f"{top['peer']}: TTFT p99 {' / '.join(fmt(x['llamacpp_ttft_p99_ms'], 0) for x in comp)} ms; goodput "
            f"{fmt(top['llamacpp_goodput'])} req/s",
            lower and (ratio is None and top["goodput"] > 0 or ratio is not None and ratio >= 2), None)


def _cost(r: dict) -> Reading:
    mine = max(x["output_throughput"] for x in _rows(r, SERVED))
    peer = max((x["output_throughput"] for x in _rows(r, PEER)), default=None)
    usd = usd_per_1m(mine)
    return (f"${usd:.2f} per 1M output tokens ({fmt(mine)} tok/s at ${USD_PER_HOUR:g}/h)",
            f"{PEER}: ${usd_per_1m(peer):.2f} ({fmt(peer)} tok/s)" if peer else None, usd <= 0.15,
            saving(peer, mine) + f" vs {PEER}" if peer else None)


def _chunked(r: dict) -> Reading:
    on, off = _rows(r, BUDGETED)[-1], _rows(r, SERVED)[-1]
    return (f"at {fmt(on['request_rate'])} req/s with the budget: TPOT p99 {fmt(on['tpot_ms']['p99'], 0)} ms, ITL p99 "
            f"{fmt(on['itl_ms']['p99'], 0)} ms, TTFT p99 {fmt(on['ttft_ms']['p99'], 0)} ms",
            f"whole chunks: TPOT p99 {fmt(off['tpot_ms']['p99'], 0)} ms, ITL p99 {fmt(off['itl_ms']['p99'], 0)} ms, "
            f"TTFT p99 {fmt(off['ttft_ms']['p99'], 0)} ms",
            on["itl_ms"]["p99"] < off["itl_ms"]["p99"], saving(off["output_throughput"], on["output_throughput"]))


def _quant(r: dict) -> Reading:
    rows = {x["format"]: x for x in r["rows"]}
    bf16 = rows["bf16"]
    int4 = next(x for k, x in rows.items() if k.startswith("int4"))
    mem = bf16["linear_weight_bytes"] / int4["linear_weight_bytes"]
    whole = bf16["weight_bytes"] / int4["weight_bytes"]
    speed = int4["decode_tok_s"] / bf16["decode_tok_s"]
    cpp = rows.get("llama.cpp")
    return (f"{int4['format']}: linear weights {mem:.2f}x smaller than bf16 (all weights {whole:.2f}x), decode "
            f"{speed:.2f}x faster, ppl {(int4['ppl'] / bf16['ppl'] - 1) * 100:+.1f} %",
            f"llama.cpp (the GGUF): {fmt(cpp['decode_tok_s'])} decode tok/s vs int4 {fmt(int4['decode_tok_s'])}"
            if cpp else None, mem >= 4, saving(bf16["decode_tok_s"], int4["decode_tok_s"]) + " (bf16 -> int4)")


def _tput(r: dict, engine: str, policy: str | None = None) -> dict | None:
    rows = [x for x in r["results"] if x["engine"] == engine and (policy is None or x["policy"] == policy)]
    return max(rows, key=lambda x: x["concurrency"]) if rows else None


def _batching(r: dict) -> Reading:
    cont, static = _tput(r, "thrifty", "continuous"), _tput(r, "thrifty", "static")
    x = cont["output_tokens_per_s"] / static["output_tokens_per_s"]
    return (f"continuous {fmt(cont['output_tokens_per_s'])} vs static {fmt(static['output_tokens_per_s'])} out tok/s "
            f"at concurrency {cont['concurrency']}, mixed output lengths: {x:.2f}x", None, x > 1,
            saving(static["output_tokens_per_s"], cont["output_tokens_per_s"]))


def _paged(r: dict) -> Reading:
    cont = _tput(r, "thrifty", "continuous")
    return (f"KV reserved but unused: {cont['kv_waste'] * 100:.1f} % with paged blocks",
            f"a contiguous max-length reservation per request: {cont['kv_waste_contiguous'] * 100:.1f} %",
            cont["kv_waste"] < 0.04, None)


def _peers(r: dict) -> Reading:
    cont = _tput(r, "thrifty", "continuous")
    others = [x for x in (_tput(r, e) for e in ("hf", "llamacpp")) if x]
    return (f"thrifty {fmt(cont['output_tokens_per_s'])} out tok/s at concurrency {cont['concurrency']}",
            "; ".join(f"{x['engine']} {fmt(x['output_tokens_per_s'])}" for x in others) or None,
            all(cont["output_tokens_per_s"] > x["output_tokens_per_s"] for x in others) if others else None,
            "; ".join(saving(x["output_tokens_per_s"], cont["output_tokens_per_s"]) + f" vs {x['engine']}"
                      for x in others) or None)


def _prefix(r: dict) -> Reading:
    x = r["ratios"]["ttft_speedup_hit_vs_cold"]
    cut = r["ratios"].get("prompt_tokens_computed_reduction")
    return (f"TTFT {fmt(x)}x faster on a prefix hit; prompt tokens computed {(cut or 0) * 100:.0f} % fewer", None,
            r["met"].get("ttft_speedup_hit_vs_cold"),
            f"a cached prompt token is billed {CACHED_INPUT_FRACTION:.0%} of an uncached one: "
            f"{1 - CACHED_INPUT_FRACTION:.0%} of the input price saved per hit token")


def _kv(r: dict) -> Reading:
    rows = {x["kv_dtype"]: x for x in r["rows"]}
    ctx = max(x["context"] for x in r["decode"])
    speed = {x["kv_dtype"]: x["decode_tok_s"] for x in r["decode"]
             if x["context"] == ctx and x["engine"].startswith("thrifty")}
    parts = [f"{k}: {v['bytes_vs_bf16']:.2f}x the bytes, ppl {v['ppl_vs_bf16'] * 100:+.2f} %, greedy "
             f"{v['greedy_identical']}/{v['greedy_prompts']} identical, {fmt(speed.get(k))} tok/s at {ctx}"
             for k, v in rows.items() if k != "bfloat16"]
    best = max((k for k in speed if k != "bfloat16"), key=lambda k: speed[k], default=None)
    return ("; ".join(parts), f"bf16 KV {fmt(speed.get('bfloat16'))} tok/s at context {ctx}",
            all(v["bytes_vs_bf16"] <= 0.55 for k, v in rows.items() if k != "bfloat16"),
            saving(speed["bfloat16"], speed[best]) + f" ({best} KV, context {ctx})" if best else None)


def _window(r: dict) -> Reading:
    held = r["held_vs_full_attention"]
    return (f"KV held {held * 100:.0f} % of full attention's at {r['config']['context']} tokens, outputs identical: "
            f"{r['outputs_identical']}", None, held < 0.5 and r["outputs_identical"], None)


def _spec(r: dict) -> Reading:
    rows = [x for x in r["results"] if x["method"] != "off"]
    best = max(rows, key=lambda x: x["speedup"])
    off = next(x for x in r["results"] if x["method"] == "off" and x["workload"] == best["workload"]
               and x["batch"] == best["batch"])
    return (f"{best['speedup']:.2f}x output tok/s on {best['workload']} (batch {best['batch']}), outputs identical: "
            f"{all(x['identical'] for x in rows)}", None, 2 <= best["speedup"],
            saving(off["output_tokens_per_s"], best["output_tokens_per_s"]))


def _semantic(r: dict) -> Reading:
    return (f"on labelled pairs (not traffic): {r['hit_rate'] * 100:.0f} % of should-hit pairs served, "
            f"{r['false_hit_rate'] * 100:.1f} % of traps let through", None, None,
            f"each hit saves its whole answer: ${CLOUD_USD_PER_1M_OUT:g} per 1M output tokens at the cloud tier's "
            f"price, x the hit rate")


REPLAY_ARGS = ("cache", "replay")


def _exact(r: dict) -> Reading:
    x = r["exact_hit_rate"]
    return (f"{x * 100:.2f} % of {r['requests']} first turns repeat exactly", None, 0.15 <= x,
            f"${x * CLOUD_USD_PER_1M_OUT:.3f} saved per 1M output tokens of traffic at the cloud tier's "
            f"${CLOUD_USD_PER_1M_OUT:g} (hit rate x price)")


def _semantic_traffic(r: dict) -> Reading:
    x = r["semantic_hit_rate"]
    return (f"{x * 100:.2f} % more served by the semantic cache ({r['semantic_hits']} of {r['requests']}; "
            f"examples in the raw JSON)", None, 0.10 <= x,
            f"${x * CLOUD_USD_PER_1M_OUT:.3f} saved per 1M output tokens of traffic at the cloud tier's price")


SERVE_ARGS = ("bench", "serve", "--model", MODEL, "--serve", f"{SERVED},{BUDGETED},{PEER}",
              "--dataset", "sharegpt", "--num-prompts", "8", "--request-rate", "0.5,1,2", "--max-output-len", "64",
              "--goodput", "ttft:2000,tpot:200", "--no-progress")
THROUGHPUT_ARGS = ("bench", "throughput", "--model", MODEL, "--weights", "gguf", "--threads", "2",
                   "--policies", "continuous,static", "--peers", "hf,llamacpp", "--concurrency", "8",
                   "--requests", "16", "--prompt-len", "128", "--output-len-range", "16:128", "--no-progress")
QUANT_ARGS = ("bench", "quant", "--model", MODEL, "--formats", "bf16,int4,llamacpp", "--group-sizes", "32",
              "--max-eval-tokens", "1024", "--greedy-prompts", "4", "--greedy-tokens", "16", "--decode-tokens", "32",
              "--prefill-tokens", "256", "--threads", "2", "--no-progress")
NOT_HERE = "nothing measures it here: "
CLAIMS: tuple[Claim, ...] = (
    Claim("serving", "serving benchmark on ShareGPT beside llama.cpp's llama-server (parallel slots, continuous "
          "batching): thrifty's p99 TTFT lower at every rate, goodput (TTFT <= 2 s, TPOT <= 200 ms) >= 2x at the "
          "highest", "issue 19's bar", SERVE_ARGS, 5.0, _serve, plot=True),
    Claim("cost", "dollars per 1M output tokens for the whole stack (ShareGPT, the best rate)",
          "$0.15 per 1M on 2x H100", SERVE_ARGS, 0.0, _cost),
    Claim("quantization", "quantized weights: 4-8x less memory and bandwidth than 16-bit", "4-8x", QUANT_ARGS, 3.0,
          _quant),
    Claim("continuous-batching", "continuous batching against static batching on mixed output lengths",
          "continuous > static", THROUGHPUT_ARGS, 3.0, _batching),
    Claim("paged-kv", "paged KV cache: near-zero reserved-but-unused KV memory", "< 4 % waste", THROUGHPUT_ARGS, 0.0,
          _paged),
    Claim("peers", "beside llama.cpp (llama-cpp-python) and transformers on the same model and machine",
          "faster than both", THROUGHPUT_ARGS, 0.0, _peers),
    Claim("chunked-prefill", "chunked prefill keeps decoding streams flowing while long prompts arrive (the "
          "default prefill budget vs whole 2048-token chunks, ShareGPT at the highest rate)",
          "lower inter-token latency", SERVE_ARGS, 0.0, _chunked),
    Claim("prefix-caching", "prefix caching: a shared prompt is computed once", "TTFT >= 5x on a hit (bench prefix)",
          ("bench", "prefix", "--model", MODEL, "--shared-prefix", "1024", "--suffix", "32", "--requests", "6",
           "--no-progress"), 1.0, _prefix, plot=True),
    Claim("kv-dtypes", "int8 / fp8 KV cache: half the KV bytes at no quality loss", "2x smaller KV",
          ("bench", "kv", "--model", MODEL, "--kv-dtypes", "int8,fp8_e4m3", "--context", "512,2048", "--batch", "8",
           "--steps", "8", "--max-eval-tokens", "1024", "--greedy-prompts", "4", "--greedy-tokens", "32",
           "--llamacpp", "", "--threads", "2", "--no-progress"), 2.0, _kv),
    Claim("sliding-window", "sliding-window layers hold only the window's KV (Gemma 3)", "KV bounded by the window",
          ("bench", "window", "--model", "gemma-3-270m", "--context", "4096", "--output-len", "16", "--threads", "2"),
          1.0, _window),
    Claim("speculative", "speculative decoding", "2-3x faster decoding",
          ("bench", "spec", "--model", MODEL, "--workloads", "code-edit", "--batch", "1", "--requests", "2",
           "--output-len", "64", "--no-progress"), 1.0, _spec),
    Claim("cascade", "cascade routing: 60-80 % cheaper at the same quality", "60-80 % cheaper",
          reason=NOT_HERE + "`thrifty bench router` runs HumanEval through the 0.5B and the 1.5B and trains its "
          "classifier first (about an hour on 2 cores), past a 15-minute budget"),
    Claim("exact-cache", "exact response cache hit rate on production traffic (here: public ShareGPT first turns "
          "replayed in order through the gateway's cache keys)", "15-30 %", REPLAY_ARGS, 1.5, _exact),
    Claim("semantic-cache-traffic", "semantic cache hits beyond the exact ones on the same replay (behind the trap "
          "guard)", "10-20 % more", REPLAY_ARGS, 0.0, _semantic_traffic),
    Claim("semantic-cache", "the semantic cache on labelled pairs: hits it should serve, traps it must refuse",
          "10-20 % more", ("cache", "eval"), 1.0, _semantic),
    Claim("coalescing", "identical requests in flight share one generation",
          "one generation per group", reason=NOT_HERE + "tested (tests/test_gateway*.py: N identical concurrent "
          "requests, one backend call) but no benchmark; its saving is the duplicates' share of traffic, which "
          "public traces do not record"),
    Claim("cost-ledger", "a cost ledger: every request's cost beside the baseline, the saving of each technique",
          "per technique", reason="the ledger prices tokens (router.machine_usd_per_hour, cached_input_fraction); its "
          "per-technique figure is the `usd` column of each row above, at the same prices"),
)


def run_claims(budget_min: float, out: str | Path, claims: tuple[Claim, ...] = CLAIMS) -> dict:
    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    deadline, start = time.monotonic() + budget_min * 60, time.monotonic()
    done: dict[tuple[str, ...], tuple[dict | None, str, float, Path]] = {}   # one run per command
    need: dict[tuple[str, ...], float] = {}   # a command's minutes: the most any claim that reads it gives
    for c in claims:
        need[c.argv] = max(need.get(c.argv, 0.0), c.minutes)
    outcomes: dict[str, Outcome] = {}
    for c in sorted(claims, key=lambda c: need[c.argv]):   # the shortest commands first: most claims per budget
        o = Outcome(c.key, c.claim, c.seed, "thrifty " + " ".join(c.argv) if c.argv else "")
        if not c.argv or c.read is None:
            o.status = c.reason or "no benchmark yet"
        elif c.argv not in done and time.monotonic() + need[c.argv] * 60 > deadline:
            o.status = (f"skipped: needs ~{need[c.argv]:g} min, the budget had "
                        f"{max(0.0, deadline - time.monotonic()) / 60:.1f}")
        else:
            if c.argv not in done:
                done[c.argv] = _run(c, out, deadline)
            report, o.status, o.seconds, png = done[c.argv]
            if report is not None:
                try:
                    o.thrifty, o.peer, o.met, o.usd = c.read(report)
                except (KeyError, ValueError, StopIteration, ZeroDivisionError, TypeError) as e:
                    o.status = f"measured, but its report could not be read: {type(e).__name__} {e}"
                if c.plot and png.is_file():
                    o.plot_png = base64.b64encode(png.read_bytes()).decode()
        outcomes[c.key] = o
    return {"report": "claims", "date": now_iso(), "budget_min": budget_min,
            "took_min": (time.monotonic() - start) / 60, "hardware": hardware_info(),
            "claims": [asdict(outcomes[c.key]) for c in claims]}


def _run(c: Claim, out: Path, deadline: float) -> tuple[dict | None, str, float, Path]:
    path, png = out / "raw" / f"{c.key}.json", out / "raw" / f"{c.key}.png"
    argv = [sys.executable, "-c", "import sys; from thrifty.cli import main; sys.exit(main())", *c.argv,
            "--json", str(path), *(("--plot", str(png)) if c.plot else ())]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=max(1.0, deadline - t0))
    except subprocess.TimeoutExpired:
        return None, "stopped: the budget ran out", time.monotonic() - t0, png
    took = time.monotonic() - t0
    if proc.returncode != 0 or not path.is_file():
        last = (proc.stderr.strip().splitlines() or [""])[-1]   # the error itself: one line for the table
        return None, f"failed (exit {proc.returncode}): {last[-300:]}", took, png
    return json.loads(path.read_text()), "measured", took, png


def write(report: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    rows = [[c["key"], c["seed"], c["thrifty"], c["peer"], c["met"], c["usd"], c["status"]] for c in report["claims"]]
    h = report["hardware"]
    md = "\n".join([f"# thrifty's claims, measured {report['date']}",
                    f"{h['cpu']}, {h['cores']} cores; budget {report['budget_min']:g} min, took "
                    f"{report['took_min']:.1f} min", "",
                    markdown_table(["claim", "seed", "thrifty", "peer", "met", "cost headline", "status"], rows), ""]
                   + [f"- `{c['key']}`: {c['claim']}; `{c['command']}`" for c in report["claims"] if c["command"]])
    slim = {**report, "claims": [{k: v for k, v in c.items() if k != "plot_png"} for c in report["claims"]]}
    (out / "claims.md").write_text(md + "\n")
    (out / "claims.json").write_text(json.dumps(slim, indent=2) + "\n")
    (out / "claims.html").write_text(_html(report))
    return [out / "claims.html", out / "claims.md", out / "claims.json"]


def _html(report: dict) -> str:
    e = html.escape
    met = {True: "met", False: "not met", None: "-"}
    rows = "".join(
        f"<tr><td>{e(c['key'])}</td><td>{e(c['claim'])}</td><td>{e(c['seed'])}</td><td>{e(c['thrifty'] or '-')}</td>"
        f"<td>{e(c['peer'] or '-')}</td><td>{met[c['met']]}</td><td>{e(c['usd'] or '-')}</td><td>{e(c['status'])}</td>"
        f"<td><code>{e(c['command'])}</code></td></tr>" for c in report["claims"])
    plots = "".join(f"<h2>{e(c['key'])}</h2><img alt='{e(c['key'])}' src='data:image/png;base64,{c['plot_png']}'>"
                    for c in report["claims"] if c.get("plot_png"))
    h = report["hardware"]
    return (f"<!doctype html><meta charset='utf-8'><title>thrifty claims</title><style>body{{font:14px system-ui;"
            f"margin:24px}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}table{{border-collapse:"
            f"collapse}}img{{max-width:100%}}</style><h1>thrifty's claims, measured {e(report['date'])}</h1>"
            f"<p>{e(h['cpu'])}, {h['cores']} cores, torch {e(h['torch_version'])}; budget {report['budget_min']:g} "
            f"min, took {report['took_min']:.1f} min</p><table><tr><th>claim</th><th>what</th><th>seed</th>"
            f"<th>thrifty</th><th>peer</th><th>met</th><th>cost headline</th><th>status</th><th>command</th></tr>{rows}</table>{plots}")
