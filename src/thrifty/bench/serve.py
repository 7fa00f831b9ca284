"""`thrifty bench serve`: an OpenAI-compatible server under an arrival process, as users compare serving stacks
(vLLM's `bench serve`, SGLang's bench_serving): per request rate, throughput, TTFT / TPOT / ITL / end-to-end
latency percentiles and goodput under SLOs.

Against `--base-url` (any server), or against servers it starts itself (`--serve thrifty,llamacpp`), measured
one after the other on the same model file and thread count. Each rate gets its own slice of the prompts, so a
server's prefix cache never sees a prompt twice across rates.
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from thrifty.bench import serve_peers as peers
from thrifty.bench.arrivals import arrival_times
from thrifty.bench.serve_client import request_body, send
from thrifty.bench.serve_data import DatasetSpec, ServeRequest, build, load_tokenizer
from thrifty.bench.serve_metrics import RequestTiming, summarize
from thrifty.bench.stats import hardware_info, now_iso
from thrifty.errors import InvalidRequestError


# the peers thrifty is compared with, strongest first: compare() measures each thrifty target against the first
# of these that ran
PEERS = ("llama-server", "llamacpp")


@dataclass(slots=True)
class ServeConfig:
    model: str
    dataset: DatasetSpec
    rates: list[float]
    base_url: str | None = None
    serve: list[str] = field(default_factory=list)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    goodput: dict[str, float] = field(default_factory=dict)
    threads: int = 2
    tokenizer: str | None = None
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)
    warmup: int = 2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if bool(self.base_url) == bool(self.serve):
            raise InvalidRequestError("give --base-url or --serve (not both)", "", param="base_url")
        unknown = [s for s in self.serve if s not in PEERS and peers.thrifty_engine(s) is None]
        if unknown:
            raise InvalidRequestError(f"unknown --serve {', '.join(unknown)}",
                                      f"{', '.join(PEERS)}, or thrifty with any of +{', +'.join(peers.MODIFIERS)}",
                                      param="serve")


@dataclass(slots=True)
class Target:
    name: str
    base_url: str
    extra_body: dict
    describe: dict


def run_serve(cfg: ServeConfig) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    spec = DatasetSpec(**{**asdict(cfg.dataset), "num_prompts": cfg.dataset.num_prompts * len(cfg.rates)})
    requests, data_info = build(spec, tokenizer)
    warmups = build(DatasetSpec(**{**asdict(cfg.dataset), "num_prompts": max(1, cfg.warmup), "seed": cfg.seed + 1,
                                   "max_output_len": 8, "output_len": 8}), tokenizer)[0]
    results, targets = [], []
    for target, stop in _targets(cfg, tokenizer):
        try:
            targets.append({"name": target.name, **target.describe})
            results += _measure_target(cfg, target, requests, warmups)
        finally:
            stop()
    report = {"benchmark": "serve", "date": now_iso(), "model": cfg.model,
              "dataset": {**data_info, "name": cfg.dataset.name},
              "config": _public_config(cfg), "hardware": hardware_info(), "targets": targets, "results": results}
    report["comparison"] = compare(results, cfg.goodput)
    return report


def _public_config(cfg: ServeConfig) -> dict:
    c = asdict(cfg)
    c.pop("api_key")
    c["dataset"].pop("path")          # no machine paths in a report
    c["base_url"] = "(given)" if cfg.base_url else None
    return c


def _targets(cfg: ServeConfig, tokenizer):
    """(target, stop) pairs, started lazily: one server runs at a time."""
    if cfg.base_url:
        yield Target("server", cfg.base_url, dict(cfg.extra_body), {"base_url": "(given)"}), lambda: None
        return
    from thrifty.models import zoo

    model_path = Path(zoo.resolve(cfg.model))
    with tempfile.TemporaryDirectory(prefix="thrifty-bench-serve-") as tmp:
        for name in cfg.serve:
            port = peers.free_port()
            if name == "llama-server":
                spec = peers.llama_server_spec(model_path, cfg.model, cfg.threads, port)
            elif name == "llamacpp":
                spec = peers.llamacpp_spec(model_path, cfg.model, cfg.threads, port, tokenizer.stop_token_ids)
            else:
                spec = peers.thrifty_spec(name, cfg.model, cfg.threads, port, Path(tmp))
            print(f"starting {name} ({cfg.threads} threads) ...", file=sys.stderr, flush=True)
            server = peers.ServerProcess(spec, port, Path(tmp) / f"{name}.log").__enter__()
            yield (Target(name, server.base_url, {**spec.extra_body, **cfg.extra_body},
                          {**spec.describe, "threads": cfg.threads}), server.__exit__)


def _measure_target(cfg: ServeConfig, target: Target, requests: list[ServeRequest],
                    warmups: list[ServeRequest]) -> list[dict]:
    asyncio.run(_run_rate(cfg, target, warmups, float("inf"), progress=False))
    rows, n = [], cfg.dataset.num_prompts
    for i, rate in enumerate(cfg.rates):
        timings, duration = asyncio.run(_run_rate(cfg, target, requests[i * n:(i + 1) * n], rate, cfg.progress))
        row = {"target": target.name, "request_rate": rate, "burstiness": cfg.burstiness,
               "max_concurrency": cfg.max_concurrency, **summarize(timings, duration, cfg.goodput)}
        print(f"{target.name} rate {rate:g}: {row['completed']}/{len(timings)} done, "
              f"{row['output_throughput']:.1f} out tok/s, TTFT p99 {row['ttft_ms']['p99'] or 0:.0f} ms, "
              f"{row['short_outputs']} stopped before max_tokens",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


async def _run_rate(cfg: ServeConfig, target: Target, requests: list[ServeRequest], rate: float,
                    progress: bool) -> tuple[list[RequestTiming], float]:
    times = arrival_times(len(requests), rate, cfg.burstiness, cfg.seed)
    gate = asyncio.Semaphore(cfg.max_concurrency or len(requests))
    bar = tqdm(total=len(requests), desc=f"{target.name} @ {rate:g} req/s", unit="req", disable=not progress,
               leave=False)
    limits = httpx.Limits(max_connections=len(requests) + 1, max_keepalive_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0), limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int, req: ServeRequest) -> RequestTiming:
            await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
            async with gate:
                body = request_body(cfg.model, req, target.extra_body)
                timing = await send(client, target.base_url, body, req.prompt_tokens, cfg.api_key,
                                    time.perf_counter() - start)
            timing.asked_tokens = req.output_len
            bar.update(1)
            return timing

        timings = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        duration = time.perf_counter() - start
    bar.close()
    return list(timings), duration


def compare(results: list[dict], slos: dict[str, float]) -> list[dict]:
    """thrifty's numbers over llama.cpp's at each rate (when both ran): p99 TTFT ratio, goodput ratio. The peer is
    the strongest llama.cpp server that ran (llama-server before llama-cpp-python's)."""
    by = {(r["target"], r["request_rate"]): r for r in results}
    ran = {r["target"] for r in results}
    peer_name = next((p for p in PEERS if p in ran), None)
    out = []
    for (name, rate), r in by.items():
        peer = by.get((peer_name, rate))
        if not name.startswith("thrifty") or peer is None:
            continue
        a, b = r["ttft_ms"]["p99"], peer["ttft_ms"]["p99"]
        row = {"target": name, "peer": peer_name, "request_rate": rate, "ttft_p99_ms": a, "llamacpp_ttft_p99_ms": b,
               "ttft_p99_lower": a is not None and (b is None or a < b)}
        if slos:
            ga, gb = r.get("goodput", 0.0), peer.get("goodput", 0.0)
            row.update(goodput=ga, llamacpp_goodput=gb, goodput_ratio=ga / gb if gb else None)
        out.append(row)
    return out


def format_report(report: dict) -> str:
    from thrifty.bench.report import markdown_table

    c, h = report["config"], report["hardware"]
    slo = ", ".join(f"{k} <= {v:g} ms" for k, v in c["goodput"].items()) or "none"
    rows = [[r["target"], r["request_rate"], f"{r['completed']}/{r['completed'] + r['failed']}", r["short_outputs"],
             r["request_throughput"], r["output_throughput"],
             r["ttft_ms"]["mean"], r["ttft_ms"]["p50"], r["ttft_ms"]["p99"],
             r["tpot_ms"]["mean"], r["tpot_ms"]["p50"], r["tpot_ms"]["p99"],
             r["itl_ms"]["p50"], r["itl_ms"]["p99"], r["e2el_ms"]["p50"], r["e2el_ms"]["p99"],
             r.get("goodput")] for r in report["results"]]
    lines = [f"## serve: {report['model']} on {report['dataset']['name']}, {c['dataset']['num_prompts']} prompts "
             f"per rate, burstiness {c['burstiness']:g}, max concurrency {c['max_concurrency'] or 'none'}; "
             f"goodput SLO: {slo}",
             f"{h['cpu']}, {h['cores']} cores, {c['threads']} threads per server; {report['date']}", "",
             markdown_table(["target", "rate req/s", "done", "short", "req/s", "out tok/s", "TTFT mean ms", "p50", "p99",
                             "TPOT mean ms", "p50", "p99", "ITL p50 ms", "p99", "E2E p50 ms", "p99",
                             "goodput req/s"], rows)]
    if report.get("comparison"):
        lines += ["", markdown_table(
            ["thrifty", "peer", "rate", "TTFT p99 ms", "peer TTFT p99 ms", "lower", "goodput", "peer goodput",
             "ratio"],
            [[x["target"], x["peer"], x["request_rate"], x["ttft_p99_ms"], x["llamacpp_ttft_p99_ms"], x["ttft_p99_lower"],
              x.get("goodput"), x.get("llamacpp_goodput"), x.get("goodput_ratio")] for x in report["comparison"]])]
    return "\n".join(lines)
