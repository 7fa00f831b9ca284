"""How many prompt tokens per second this engine prefills while it serves: the input to admission by deadline.

Measured from the engine's own steps: the prompt tokens each step computed over its wall time, summed over the
last WINDOW steps that prefilled at least MIN_TOKENS (a step with a handful of prompt tokens is mostly decode and
overhead, and would understate the rate). Those steps carry the decodes that ran beside the prefill, so the rate
is what a queued prompt really gets under load, not the idle machine's peak. Before any such step the rate is the
seed (the throughput probe's median, thrifty.engine.throughput), or unknown.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 32
MIN_TOKENS = 16


@dataclass(slots=True)
class PrefillRate:
    seeded: float | None = None
    steps: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def seed(self, tokens_per_s: float) -> None:
        if tokens_per_s <= 0:
            raise ValueError(f"a prefill rate must be > 0 tokens/s, got {tokens_per_s}")
        self.seeded = tokens_per_s

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens >= MIN_TOKENS and seconds > 0:
            self.steps.append((tokens, seconds))

    def tokens_per_s(self) -> float | None:
        """The measured rate over the recent prefilling steps, else the seed; None: nothing known yet."""
        if not self.steps:
            return self.seeded
        return sum(t for t, _ in self.steps) / sum(s for _, s in self.steps)
