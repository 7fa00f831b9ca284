"""How many prompt tokens a step may prefill while other requests decode: learned from the steps' own timings.

On a CPU a prompt token costs about as much compute as a whole decode step's worth of weight reads spread over
the batch, so a long prompt prefilled in big chunks stalls every running stream (a 2,048-token chunk is ~10 s on
two cores). The budget keeps a decoding request's time per token within `max_slowdown` x its time without
prefills: tokens = HEADROOM x (max_slowdown - 1) x decode step time / cost of one prefilled token, both running
averages of measured steps; every REMEASURE_EVERY steps one step decodes only, to re-measure its base. The rest of the prompt waits for the next step, so a long prompt still progresses every step,
and a short one that arrives meanwhile gets in at once (the scheduler prefills the shortest remaining first).
"""
from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.2            # weight of the newest step in the running averages
REMEASURE_EVERY = 32   # steps with prefills between two decode-only steps that re-measure what decoding costs
HEADROOM = 0.75        # aim below the bound: step times vary, and the bound holds for the slow steps too


@dataclass(slots=True)
class PrefillBudget:
    max_slowdown: float = 2.0
    min_tokens: int = 1                      # a prompt always progresses (except in a measuring step)
    decode_step_s: float | None = None       # steps that only decode
    token_s: float | None = None             # extra seconds per prefilled token in a step
    steps_since_decode_only: int = 0

    def tokens(self) -> int:
        """Prompt tokens the next step may prefill beside its decodes; 0 when that step should measure what
        decoding alone costs (none measured yet, or the last measure is REMEASURE_EVERY steps old: the batch and
        its contexts change)."""
        if self.decode_step_s is None or self.steps_since_decode_only >= REMEASURE_EVERY:
            return 0
        if self.token_s is None:
            return self.min_tokens
        allowed = HEADROOM * (self.max_slowdown - 1.0) * self.decode_step_s / max(self.token_s, 1e-9)
        return max(self.min_tokens, int(allowed))

    def observe(self, seconds: float, prefill_tokens: int, decodes: int) -> None:
        """One step's wall time, the prompt tokens it prefilled and the decoding requests it advanced."""
        if decodes and not prefill_tokens:
            self.decode_step_s = _average(self.decode_step_s, seconds)
            self.steps_since_decode_only = 0
        elif prefill_tokens:
            self.steps_since_decode_only += 1
            base = self.decode_step_s if decodes and self.decode_step_s is not None else 0.0
            self.token_s = _average(self.token_s, max(seconds - base, 0.0) / prefill_tokens)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new
