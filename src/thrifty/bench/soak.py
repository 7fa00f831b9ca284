"""`thrifty bench soak`: a thrifty server under more traffic than it can serve, for a long time, with a hostile
mix (thrifty.bench.soak_mix): does it stay up, answer or refuse everything, keep its memory and its deadline?

1. Start `thrifty serve` on the model (one tier whose timeout_s is the deadline; small batch and queue limits so
   overload turns into 429s rather than an unbounded queue).
2. Measure the sustainable rate: the mix closed-loop (--calibrate-concurrency in flight, backing off on 429) for --calibrate-s seconds;
   requests answered per second.
3. Send the mix open-loop (Poisson) at --rate-factor x that rate for --duration-s seconds, sampling the server's
   RSS every --sample-s seconds.
4. Report per window (requests by outcome, 429s, TTFT / TPOT percentiles, RSS) and the checks: no 5xx, no lost
   request, RSS growth after warm-up <= 5 %, p99 TTFT of admitted requests within the deadline.
"""
from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml
from tqdm.auto import tqdm

from thrifty.bench import serve_peers as peers
from thrifty.bench.arrivals import arrival_times
from thrifty.bench.serve_data import load_tokenizer
from thrifty.bench.soak_mix import DEFAULT_MIX, KINDS, OUTCOMES, Prompts, Result, make_request, send
from thrifty.bench.stats import hardware_info, now_iso
from thrifty.reporting import percentile

RSS_GROWTH_LIMIT = 0.05
RETRY_AFTER_S = 2.0


@dataclass(slots=True)
class SoakConfig:
    model: str
    duration_s: float = 1200.0
    rate_factor: float = 1.5
    rate: float | None = None                # given: skip the calibration
    calibrate_s: float = 90.0
    calibrate_concurrency: int = 16
    deadline_s: float = 30.0                 # the tier's timeout_s: admission judges prompts against it
    max_num_seqs: int = 32
    max_waiting: int = 16
    threads: int = 2
    warmup_s: float = 120.0                  # RSS growth is measured from the peak of this first stretch
    window_s: float = 60.0
    sample_s: float = 5.0
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    seed: int = 0
    progress: bool = True


def server_spec(cfg: SoakConfig, port: int, workdir: Path) -> peers.ServerSpec:
    engine = {"num_threads": cfg.threads, "max_num_seqs": cfg.max_num_seqs}
    config = {"model_list": [{"name": cfg.model, "model": cfg.model, "engine": engine, "timeout_s": cfg.deadline_s,
                              "price": {"input": 0.0, "cached_input": 0.0, "output": 0.0}}],
              "server": {"host": "127.0.0.1", "port": port, "log_level": "warning",
                         "max_waiting_requests": cfg.max_waiting, "ledger_path": str(workdir / "ledger.sqlite3")},
              "cache": {"enabled": False}}     # a cache would answer repeats without the model
    path = workdir / "soak.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-c", "import sys; from thrifty.cli import main; sys.exit(main())", "serve",
            "--config", str(path)]
    return peers.ServerSpec("thrifty", argv, {}, {"engine": engine, "timeout_s": cfg.deadline_s,
                                                  "max_waiting_requests": cfg.max_waiting, "response_cache": False})


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _prompt_text() -> str:
    """The standard library's sources: code and prose that are on every machine."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(lib / name).read_text(errors="replace") for name in ("argparse.py", "asyncio/base_events.py",
                                                                   "collections/__init__.py", "typing.py")]
    return "\n".join(parts)


def _kinds(mix: dict[str, float], rng: random.Random, n: int) -> list[str]:
    names = [k for k in KINDS if mix.get(k, 0) > 0]
    return rng.choices(names, [mix[k] for k in names], k=n)


async def _calibrate(cfg: SoakConfig, url: str, prompts: Prompts, model: str) -> dict:
    """Closed loop at the batch size: every worker sends its next request when the last one is answered."""
    rng = random.Random(cfg.seed + 1)
    results: list[Result] = []
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=cfg.calibrate_concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=30.0), limits=limits) as client:
        async def worker() -> None:
            while time.perf_counter() - start < cfg.calibrate_s:
                kind = _kinds(cfg.mix, rng, 1)[0]
                result = await send(client, url, make_request(kind, model, prompts, rng), time.perf_counter() - start)
                results.append(result)
                if result.outcome == "rejected":   # a 429: back off as told, or the loop spins on refusals
                    await asyncio.sleep(RETRY_AFTER_S)

        await asyncio.gather(*(worker() for _ in range(cfg.calibrate_concurrency)))
    elapsed = time.perf_counter() - start
    answered = sum(r.outcome != "rejected" for r in results)   # the mix, as sent, less what was refused for load
    return {"seconds": elapsed, "requests": len(results), "answered": answered, "rate": answered / elapsed,
            "outcomes": {o: sum(r.outcome == o for r in results) for o in OUTCOMES}}


async def _soak(cfg: SoakConfig, url: str, prompts: Prompts, model: str, rate: float,
                pid: int) -> tuple[list[Result], list[dict], float]:
    n = max(1, int(rate * cfg.duration_s))
    times = [t for t in arrival_times(n * 2, rate, 1.0, cfg.seed) if t < cfg.duration_s]
    rng = random.Random(cfg.seed)
    kinds = _kinds(cfg.mix, rng, len(times))
    samples: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=int(cfg.duration_s), desc=f"soak @ {rate:.2f} req/s", unit="s", disable=not cfg.progress)
    done: list[Result] = []

    async def sampler() -> None:
        while time.perf_counter() - start < cfg.duration_s:
            t = time.perf_counter() - start
            samples.append({"t": t, "rss_mb": rss_mb(pid), "finished": len(done)})
            counts = {o: sum(r.outcome == o for r in done) for o in ("completed", "rejected", "server_error", "lost")}
            bar.n = min(int(t), bar.total)
            bar.set_postfix(counts, refresh=True)
            await asyncio.sleep(cfg.sample_s)

    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=60.0), limits=limits) as client:
        async def one(i: int) -> Result:
            await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
            req = make_request(kinds[i], model, prompts, rng)
            result = await send(client, url, req, time.perf_counter() - start)
            done.append(result)
            return result

        watch = asyncio.ensure_future(sampler())
        results = await asyncio.gather(*(one(i) for i in range(len(times))))
        elapsed = time.perf_counter() - start
        await watch
    samples.append({"t": time.perf_counter() - start, "rss_mb": rss_mb(pid), "finished": len(done)})
    bar.n = bar.total
    bar.close()
    return list(results), samples, elapsed


def windows(results: list[Result], samples: list[dict], cfg: SoakConfig, elapsed: float) -> list[dict]:
    rows = []
    for w in range(int(max(elapsed, cfg.duration_s) // cfg.window_s + 1)):
        lo, hi = w * cfg.window_s, (w + 1) * cfg.window_s
        inside = [r for r in results if lo <= r.sent < hi]
        if not inside:
            continue
        streamed = [r.ttft for r in inside if r.ttft is not None and r.kind != "short"]
        rss = [s["rss_mb"] for s in samples if lo <= s["t"] < hi and s["rss_mb"] is not None]
        rows.append({"t0_s": lo, "sent": len(inside), **{o: sum(r.outcome == o for r in inside) for o in OUTCOMES},
                     "status": _statuses(inside),
                     "ttft_p50_s": percentile(streamed, 50), "ttft_p99_s": percentile(streamed, 99),
                     "tpot_p50_ms": _ms(percentile([r.tpot for r in inside if r.tpot], 50)),
                     "tpot_p99_ms": _ms(percentile([r.tpot for r in inside if r.tpot], 99)),
                     "rss_mb": max(rss) if rss else None})
    return rows


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def _statuses(results: list[Result]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status is not None else "none"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def checks(results: list[Result], samples: list[dict], cfg: SoakConfig) -> dict:
    """The four things a soak must show, each with its number."""
    admitted = [r for r in results if r.status == 200]
    ttfts = [r.ttft for r in admitted if r.ttft is not None]
    base = [s["rss_mb"] for s in samples if s["t"] <= cfg.warmup_s and s["rss_mb"]]
    after = [s["rss_mb"] for s in samples if s["t"] > cfg.warmup_s and s["rss_mb"]]
    growth = (max(after) / max(base) - 1) if base and after else None
    final = (after[-1] / max(base) - 1) if base and after else None
    fives = sum(r.status is not None and r.status >= 500 or r.outcome == "server_error" for r in results)
    lost = [r for r in results if r.outcome == "lost"]
    p99 = percentile(ttfts, 99)
    return {
        "no_5xx": {"ok": fives == 0, "count": fives},
        "no_lost_request": {"ok": not lost, "count": len(lost), "examples": [asdict(r) for r in lost[:5]]},
        "rss_growth_after_warmup": {"ok": growth is not None and growth <= RSS_GROWTH_LIMIT, "max_growth": growth,
                                    "final_growth": final, "warmup_peak_mb": max(base) if base else None,
                                    "peak_after_mb": max(after) if after else None, "limit": RSS_GROWTH_LIMIT},
        "ttft_p99_within_deadline": {"ok": p99 is not None and p99 <= cfg.deadline_s, "ttft_p99_s": p99,
                                     "deadline_s": cfg.deadline_s, "admitted": len(admitted),
                                     "note": "streamed: first content chunk; short (one JSON answer): the whole "
                                             "answer, an upper bound"}}


def run_soak(cfg: SoakConfig) -> dict:
    tokenizer = load_tokenizer(cfg.model)
    prompts = Prompts(_prompt_text(), tokenizer)
    with tempfile.TemporaryDirectory(prefix="thrifty-soak-") as tmp:
        port = peers.free_port()
        spec = server_spec(cfg, port, Path(tmp))
        print(f"starting thrifty serve ({cfg.threads} threads, deadline {cfg.deadline_s:g} s) ...", file=sys.stderr,
              flush=True)
        with peers.ServerProcess(spec, port, Path(tmp) / "server.log") as server:
            url = server.base_url + "/chat/completions"
            calibration = None
            rate = cfg.rate
            if rate is None:
                calibration = asyncio.run(_calibrate(cfg, url, prompts, cfg.model))
                rate = calibration["rate"] * cfg.rate_factor
                print(f"sustainable: {calibration['rate']:.3f} req/s answered (closed loop at {cfg.calibrate_concurrency}); "
                      f"soaking at {rate:.3f} req/s", file=sys.stderr, flush=True)
            results, samples, elapsed = asyncio.run(_soak(cfg, url, prompts, cfg.model, rate, server.proc.pid))
            alive = server.proc.poll() is None
    by_kind = {k: {o: sum(r.outcome == o for r in results if r.kind == k) for o in OUTCOMES}
               for k in KINDS if any(r.kind == k for r in results)}
    return {"benchmark": "soak", "date": now_iso(), "model": cfg.model, "config": asdict(cfg),
            "server": spec.describe, "hardware": hardware_info(), "calibration": calibration, "rate": rate,
            "elapsed_s": elapsed, "server_alive_at_end": alive, "requests": len(results),
            "outcomes": {o: sum(r.outcome == o for r in results) for o in OUTCOMES}, "by_kind": by_kind,
            "status": _statuses(results), "windows": windows(results, samples, cfg, elapsed),
            "checks": checks(results, samples, cfg), "rss_samples": samples,
            "results": [asdict(r) for r in results]}
