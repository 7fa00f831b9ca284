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

Reader = Callable[[dict], tuple[str, str | None, bool | None]]   # report -> (thrifty's number, the peer's, met)


@dataclass(slots=True, frozen=True)
class Claim:
    key: str
    claim: str                   # what the seed or its issue says, in words
    seed: str                    # the number it gives
    argv: tuple[str, ...] = ()   # after `thrifty`; empty: no benchmark measures it yet
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
    status: str = "not run"
    seconds: float | None = None
    plot_png: str | None = None  # base64, for the HTML page
    notes: list[str] = field(default_factory=list)


def _serve(r: dict) -> tuple[str, str | None, bool | None]:
    comp = r["comparison"]
    top = max(comp, key=lambda x: x["request_rate"])
    lower = all(x["ttft_p99_lower"] for x in comp)
    ratio = top.get("goodput_ratio")
    return (f"TTFT p99 {', '.join(fmt(x['ttft_p99_ms'], 0) for x in comp)} ms; goodput {fmt(top['goodput'])} req/s",
            f"TTFT p99 {', '.join(fmt(x['llamacpp_ttft_p99_ms'], 0) for x in comp)} ms; goodput "
            f"{fmt(top['llamacpp_goodput'])} req/s", lower and ratio is not None and ratio >= 2)


def _cost(r: dict) -> tuple[str, str | None, bool | None]:
    tput = max(x["output_throughput"] for x in r["results"] if x["target"].startswith("thrifty"))
    usd = USD_PER_HOUR / (tput * 3600) * 1e6
    return f"${usd:.2f} per 1M output tokens ({fmt(tput)} tok/s at ${USD_PER_HOUR}/h)", None, usd <= 0.15


def _prefix(r: dict) -> tuple[str, str | None, bool | None]:
    x = r["ratios"]["ttft_speedup_hit_vs_cold"]
    return f"TTFT {fmt(x)}x faster on a prefix hit", None, r["met"].get("ttft_speedup_hit_vs_cold")


def _spec(r: dict) -> tuple[str, str | None, bool | None]:
    rows = [x for x in r["results"] if x["method"] != "off"]
    best = max(rows, key=lambda x: x["speedup"])
    return (f"{best['speedup']:.2f}x output tok/s on {best['workload']} (batch {best['batch']}), outputs identical: "
            f"{all(x['identical'] for x in rows)}", None, None)


SERVE_ARGS = ("bench", "serve", "--model", MODEL, "--serve", "thrifty+gguf+no-prefill-budget,llamacpp",
              "--dataset", "sharegpt", "--num-prompts", "8", "--request-rate", "0.5,1", "--max-output-len", "64",
              "--goodput", "ttft:2000,tpot:200", "--no-progress")
CLAIMS: tuple[Claim, ...] = (
    Claim("serving", "serving benchmark on ShareGPT: thrifty's p99 TTFT below llama.cpp's server at every rate, "
          "goodput (TTFT <= 2 s, TPOT <= 200 ms) >= 2x at the highest", "issue 19's bar", SERVE_ARGS, 8.0, _serve,
          plot=True),
    Claim("cost", "dollars per 1M output tokens for the whole stack", "$0.15 per 1M on 2x H100", SERVE_ARGS, 0.0,
          _cost),
    Claim("prefix-caching", "prefix caching: a shared prompt is computed once", "not recorded here (bench prefix's own bar: TTFT >= 5x on a hit)",
          ("bench", "prefix", "--model", MODEL, "--shared-prefix", "1024", "--suffix", "32", "--requests", "6",
           "--no-progress"), 3.0, _prefix, plot=True),
    Claim("speculative", "speculative decoding speeds up decoding where outputs copy the input", "not recorded here",
          ("bench", "spec", "--model", MODEL, "--workloads", "code-edit", "--batch", "1", "--requests", "2",
           "--output-len", "64", "--no-progress"), 3.0, _spec),
    Claim("exact-cache", "exact response cache hit rate on production traffic", "15-30 %",
          reason="not measured yet: the ShareGPT replay through the gateway is not built"),
    Claim("semantic-cache", "semantic cache hits beyond the exact ones", "10-20 % more",
          reason="not measured yet: see `thrifty cache eval` (pairs, not traffic) in the README"),
    Claim("weight-formats", "int4 weights keep quality at a quarter of the memory", "not recorded here",
          ("bench", "quant", "--model", MODEL), 45.0,
          reason="longer than a short budget: results/2026-12-04-epyc-zen3-2core-quant/ holds the last full run"),
)


def run_claims(budget_min: float, out: str | Path, claims: tuple[Claim, ...] = CLAIMS) -> dict:
    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    deadline, start = time.monotonic() + budget_min * 60, time.monotonic()
    done: dict[tuple[str, ...], tuple[dict | None, str, float, Path]] = {}   # one run per command
    outcomes = []
    for c in claims:
        o = Outcome(c.key, c.claim, c.seed, "thrifty " + " ".join(c.argv) if c.argv else "")
        if not c.argv or c.read is None:
            o.status = c.reason or "no benchmark yet"
        elif c.argv not in done and time.monotonic() + c.minutes * 60 > deadline:
            o.status = f"skipped: needs ~{c.minutes:g} min, the budget had {(deadline - time.monotonic()) / 60:.1f}"
        else:
            if c.argv not in done:
                done[c.argv] = _run(c, out, deadline)
            report, o.status, o.seconds, png = done[c.argv]
            if report is not None:
                o.thrifty, o.peer, o.met = c.read(report)
                if png.is_file():
                    o.plot_png = base64.b64encode(png.read_bytes()).decode()
        outcomes.append(o)
    return {"report": "claims", "date": now_iso(), "budget_min": budget_min,
            "took_min": (time.monotonic() - start) / 60, "hardware": hardware_info(),
            "claims": [asdict(o) for o in outcomes]}


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
        return None, f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}", took, png
    return json.loads(path.read_text()), "measured", took, png


def write(report: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    rows = [[c["key"], c["seed"], c["thrifty"], c["peer"], c["met"], c["status"]] for c in report["claims"]]
    h = report["hardware"]
    md = "\n".join([f"# thrifty's claims, measured {report['date']}",
                    f"{h['cpu']}, {h['cores']} cores; budget {report['budget_min']:g} min, took "
                    f"{report['took_min']:.1f} min", "",
                    markdown_table(["claim", "seed", "thrifty", "peer", "met", "status"], rows), ""]
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
        f"<td>{e(c['peer'] or '-')}</td><td>{met[c['met']]}</td><td>{e(c['status'])}</td>"
        f"<td><code>{e(c['command'])}</code></td></tr>" for c in report["claims"])
    plots = "".join(f"<h2>{e(c['key'])}</h2><img alt='{e(c['key'])}' src='data:image/png;base64,{c['plot_png']}'>"
                    for c in report["claims"] if c.get("plot_png"))
    h = report["hardware"]
    return (f"<!doctype html><meta charset='utf-8'><title>thrifty claims</title><style>body{{font:14px system-ui;"
            f"margin:24px}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}table{{border-collapse:"
            f"collapse}}img{{max-width:100%}}</style><h1>thrifty's claims, measured {e(report['date'])}</h1>"
            f"<p>{e(h['cpu'])}, {h['cores']} cores, torch {e(h['torch_version'])}; budget {report['budget_min']:g} "
            f"min, took {report['took_min']:.1f} min</p><table><tr><th>claim</th><th>what</th><th>seed</th>"
            f"<th>thrifty</th><th>peer</th><th>met</th><th>status</th><th>command</th></tr>{rows}</table>{plots}")
