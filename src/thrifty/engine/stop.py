"""Stop strings on the detokenized output text of one request (streaming-safe)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from thrifty.engine.sampling import SamplingParams


@dataclass(slots=True)
class StopResult:
    """text: the full output text, cut at the stop when one was found; stop: the stop string that hit."""

    text: str
    finished: bool
    stop: str | None = None


class StopChecker:
    """Finds stop strings in the growing output text of one request.

    Contract for streaming: text already checked holds no stop string; a stop may begin in the old text
    (straddling the boundary) only within the last `holdback(old_text)` characters, which the stream
    must not have sent yet.
    """

    __slots__ = ("stops", "include_stop", "_max_len")

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stops = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self._max_len = max((len(s) for s in self.stops), default=0)

    @classmethod
    def from_params(cls, params: SamplingParams) -> StopChecker:
        return cls(params.stop or [], params.include_stop_str_in_output)

    def check(self, old_text: str, new_text: str) -> StopResult:
        """Look for the first stop to complete in old_text + new_text (it ends inside new_text).

        First means the one that ends earliest, as if the text had arrived one character at a time, so
        the result does not depend on how the text was split into pieces; among stops ending at the
        same character the longest wins. The returned text ends before the stop, or after it with
        include_stop_str_in_output.
        """
        text = old_text + new_text
        if not self.stops or not new_text:
            return StopResult(text, False)
        start_from = max(0, len(old_text) - self._max_len + 1)
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stops:
            pos = text.find(s, start_from)  # a stop's first occurrence is also its earliest end
            if pos != -1 and (best is None or (pos + len(s), pos) < best[:2]):
                best = (pos + len(s), pos, s)
        if best is None:
            return StopResult(text, False)
        end, start, s = best
        return StopResult(text[:end] if self.include_stop else text[:start], True, s)

    def holdback(self, text: str) -> int:
        """How many trailing characters of text could be the start of a stop string (not to stream yet).

        Zero with include_stop_str_in_output: those characters are sent whether or not a stop completes.
        """
        if self.include_stop or not self.stops:
            return 0
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def streamable(self, text: str) -> int:
        """Length of the prefix of text that is safe to send now."""
        return len(text) - self.holdback(text)
