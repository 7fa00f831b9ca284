"""The `cascade` strategy: the cheapest tier answers first; a cheap check decides whether the answer stands.

Checks (router.check):
- `code`: when the request or the answer holds code, the answer's code must parse and the request's own
  examples (doctest lines, `f(x) == y`) must pass, run in the sandbox (thrifty.gateway.sandbox);
- `logprob`: the answer's confidence, exp(mean token logprob), must reach the threshold;
- `code+logprob`: both.
A failed check sends the request one tier up; the escalated request pays for both answers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from thrifty.config import RouterSettings
from thrifty.gateway.calibration import DEFAULT_THRESHOLD, stored_threshold
from thrifty.gateway.code_check import check_answer, extract_code
from thrifty.gateway.router import Answer, Route, RouteRequest, next_tier


@dataclass(slots=True)
class CascadeRouter:
    tiers: list[str]
    check: str = "code+logprob"
    threshold: float = DEFAULT_THRESHOLD
    sandbox_timeout_s: float = 5.0
    sandbox_memory_mb: int = 512
    strategy: str = "cascade"

    @classmethod
    def from_settings(cls, settings: RouterSettings, tiers: list[str]) -> CascadeRouter:
        threshold = settings.threshold
        if threshold is None:
            threshold = stored_threshold(settings.calibration_path, "cascade", settings.check)
        return cls(tiers, settings.check, DEFAULT_THRESHOLD if threshold is None else threshold,
                   settings.sandbox_timeout_s, settings.sandbox_memory_mb)

    def choose(self, request: RouteRequest) -> Route:
        return Route(self.tiers[0], "cascade: cheapest first")

    def escalate(self, request: RouteRequest, answer: Answer, tier: str) -> tuple[bool, str]:
        if next_tier(self.tiers, tier) is None:
            return False, "cascade: largest tier"
        reason = self.verdict(self.code_verdict(request, answer), confidence_of(answer), self.threshold)
        return reason is not None, reason or "cascade: check passed"

    def code_verdict(self, request: RouteRequest, answer: Answer) -> str | None:
        """Why the answer fails the threshold-free checks (cut off, code check), or None. Slow (a sandbox run)."""
        if answer.finish_reason == "length":
            return "cascade: answer cut at max_tokens"
        if "code" in self.check and (extract_code(answer.text) is not None or "def " in request.text):
            check = check_answer(request.text, answer.text, self.sandbox_timeout_s, self.sandbox_memory_mb)
            if not check.passed:
                return f"cascade: {check.reason}"
        return None

    def verdict(self, code_reason: str | None, confidence: float | None, threshold: float) -> str | None:
        """Why to escalate, or None; cheap, so calibration can sweep thresholds over stored code verdicts."""
        if code_reason is not None:
            return code_reason
        if "logprob" in self.check and confidence is not None and confidence < threshold:
            return f"cascade: confidence {confidence:.2f}<{threshold:.2f}"
        return None


def confidence_of(answer: Answer) -> float | None:
    mean = answer.mean_logprob()
    return None if mean is None else math.exp(mean)
