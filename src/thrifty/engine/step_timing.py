"""Where one engine step's wall time goes, phase by phase (`thrifty bench step` reads it after each step).

A handful of perf_counter reads a step: cheap enough to keep on always, so what the benchmark measures is the
engine exactly as it serves.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

PHASES = ("schedule", "inputs", "forward", "logits", "sampling", "postprocess")


@dataclass(slots=True)
class StepTiming:
    schedule: float = 0.0      # scheduler policy and block bookkeeping, the batch's StepInputs
    inputs: float = 0.0        # token / position tensors and the attention metadata
    forward: float = 0.0       # the model over every token of the step
    logits: float = 0.0        # the output head over the rows that sample
    sampling: float = 0.0      # logits -> tokens (and logprobs)
    postprocess: float = 0.0   # tokens appended, prefix blocks hashed, detokenized, stop checks, outputs

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class Stopwatch:
    """Successive laps into one StepTiming: `lap("inputs")` books the time since the previous lap."""

    __slots__ = ("timing", "_last")

    def __init__(self, timing: StepTiming) -> None:
        self.timing, self._last = timing, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        setattr(self.timing, phase, getattr(self.timing, phase) + now - self._last)
        self._last = now
