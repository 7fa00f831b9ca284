"""When each request of a serving benchmark is sent: a Poisson process, or a gamma one for bursty traffic.

Intervals are gamma-distributed with shape `burstiness` and mean 1 / rate (vLLM's `--burstiness`): burstiness 1
is a Poisson process (exponential gaps), below 1 burstier, above 1 steadier (the gaps' coefficient of
variation is 1 / sqrt(burstiness)). An infinite rate sends everything at once.
"""
from __future__ import annotations

import math
import random


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds after the start at which each of `n` requests is sent (the first at 0)."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("the request rate and the burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)     # mean gap = shape * scale = 1 / rate
    times, t = [], 0.0
    for i in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, scale)
    return times


def parse_rates(text: str) -> list[float]:
    """'0.5,1,inf' -> [0.5, 1.0, inf]."""
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated request rates (requests/s or inf), got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise ValueError(f"request rates must be > 0, got {text!r}")
    return rates
