"""Percentiles, one run's result row, and the machine a report was measured on."""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from thrifty.reporting import percentile  # noqa: F401  (bench modules import it from here)


@dataclass(slots=True)
class RunResult:
    """One (engine, policy, concurrency) measurement: the row of the throughput table and of the JSON."""
    engine: str
    policy: str
    concurrency: int
    requests: int
    output_tokens: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    kv_waste: float | None = None
    kv_waste_contiguous: float | None = None
    extra: dict = field(default_factory=dict)       # engine-specific figures (preemptions, prefill tok/s, ...)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_timings(cls, engine: str, policy: str, concurrency: int, duration_s: float, output_tokens: int,
                     ttfts: Sequence[float], tpots: Sequence[float | None], **kw) -> RunResult:
        n = len(ttfts)
        return cls(engine, policy, concurrency, n, output_tokens, duration_s,
                   output_tokens / duration_s if duration_s > 0 else 0.0, n / duration_s if duration_s > 0 else 0.0,
                   percentile(ttfts, 50), percentile(ttfts, 99), percentile(tpots, 50), percentile(tpots, 99), **kw)

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
