"""A scripted stand-in for the cascade router (the real strategies are tested in test_router_*.py)."""
from __future__ import annotations

from thrifty.gateway.router import Route


class ScriptedCascade:
    """Cheapest tier first; escalates when the request's text holds `marker`; remembers every answer it saw."""
    strategy = "cascade"

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.answers = []

    def choose(self, rr):
        return Route("small", "cascade: cheapest first")

    def escalate(self, rr, answer, tier):
        self.answers.append(answer)
        up = self.marker in rr.text
        return up, "cascade: examples failed" if up else "cascade: check passed"
