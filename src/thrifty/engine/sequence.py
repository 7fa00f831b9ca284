"""A request's state inside the engine: tokens, status, progress, sampling state, timings."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import torch

from thrifty.engine.sampling import SamplingParams, TokenHistory
from thrifty.engine.stop import StopChecker

if TYPE_CHECKING:
    from thrifty.engine.speculative import SpecState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token or a stop string
    LENGTH = "length"    # max_tokens or the context length
    ABORT = "abort"


@dataclass(slots=True)
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    extra_key: str | None = None                      # prefix-cache isolation (tenant salt)
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0                      # tokens whose KV is in the cache
    num_cached_tokens: int = 0                        # prompt tokens served by prefix-cache hits (first admission)
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    history: TokenHistory | None = None
    stop_checker: StopChecker | None = None
    detokenizer: object | None = None                 # IncrementalDetokenizer
    text: str = ""
    num_streamed_chars: int = 0                       # how much of `text` outputs have shown so far
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    draft_token_ids: list[int] = field(default_factory=list)  # proposed this step, not yet verified (no KV kept)
    spec: SpecState | None = None                     # speculative decoding's per-request state

    def __post_init__(self) -> None:
        self.history = TokenHistory(self.prompt_token_ids, self.output_token_ids)
        self.stop_checker = StopChecker.from_params(self.params)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def time_per_output_token(self) -> float | None:
        n = len(self.output_token_ids)
        if n < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (n - 1)
