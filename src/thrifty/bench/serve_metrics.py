"""The serving benchmark's numbers from each request's timings: throughput, TTFT / TPOT / ITL / end-to-end
latency (mean, p50, p99) and goodput under SLOs, as vLLM's `bench serve` defines them.

- TTFT: from sending the request to its first streamed token.
- TPOT: per request, (end-to-end - TTFT) / (output tokens - 1): the mean time per token after the first.
- ITL: every gap between two streamed chunks, over all requests (a chunk may carry several tokens).
- goodput: requests per second that met every SLO given (a failed request meets none).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from statistics import fmean

from thrifty.reporting import percentile

METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(slots=True)
class RequestTiming:
    """One request as the client saw it; times in seconds."""
    sent: float = 0.0                       # when it was sent, after the run's start
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2el: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    asked_tokens: int | None = None         # max_tokens; a server that stops early is shown, not hidden
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def parse_goodput(text: str | None) -> dict[str, float]:
    """'ttft:2000,tpot:200' -> {'ttft': 2000.0, 'tpot': 200.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition(":")
        name = name.strip().lower()
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS,tpot:MS,e2el:MS, got {part!r}")
        slos[name] = float(value)
    return slos


def meets(t: RequestTiming, slos: dict[str, float]) -> bool:
    if not t.ok:
        return False
    values = {"ttft": t.ttft, "tpot": t.tpot, "e2el": t.e2el}
    return all(values[k] is None or values[k] * 1000 <= limit for k, limit in slos.items())


def _ms(values: list[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values if v is not None]
    return {"mean": fmean(ms) if ms else None, "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


def summarize(timings: list[RequestTiming], duration_s: float, slos: dict[str, float] | None = None) -> dict:
    """One rate's row of the report."""
    done = [t for t in timings if t.ok]
    out_tokens = sum(t.output_tokens for t in done)
    in_tokens = sum(t.prompt_tokens for t in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    row = {"completed": len(done), "failed": len(timings) - len(done), "duration_s": duration_s,
           "request_throughput": per_s(len(done)), "output_throughput": per_s(out_tokens),
           "total_token_throughput": per_s(out_tokens + in_tokens), "prompt_tokens": in_tokens,
           "output_tokens": out_tokens,
           "ttft_ms": _ms([t.ttft for t in done]), "tpot_ms": _ms([t.tpot for t in done]),
           "itl_ms": _ms([gap for t in done for gap in t.itls]), "e2el_ms": _ms([t.e2el for t in done])}
    row["short_outputs"] = sum(t.asked_tokens is not None and t.output_tokens < t.asked_tokens for t in done)
    if slos:
        good = sum(meets(t, slos) for t in timings)
        row["goodput"] = per_s(good)
        row["good_requests"] = good
    errors = sorted({t.error for t in timings if t.error})
    if errors:
        row["errors"] = errors[:5]
    return row
