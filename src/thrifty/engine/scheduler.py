"""Who runs this step, and how many tokens each: the policy. Bookkeeping is the block manager's, compute the runner's.

The output is a plain map {request_id: num_tokens}: a prefill chunk, a decode step (1) and a decode
with speculative drafts (1 + the drafts in `seq.draft_token_ids`) are all the same kind of thing. Three policies:
- continuous: requests join and leave every step. Decodes go first (never starved by prefills); then prompts,
  new ones before the rest of long ones already started, shortest remaining first, in chunks. With
  `max_decode_slowdown` set (a server sets 2.0), a step that decodes prefills only as many prompt tokens as keep
  the decodes' time per token within that factor of its value without prefills (engine/prefill_budget.py:
  learned from step timings); unset, prompts fill the step's token budget (offline throughput).
- static: wait for a full batch (max_num_seqs) or a timeout, run that batch to the end, then the next.
- bucketed: static batches of prompts of similar length (cuts padding in padded engines).
When blocks run out, the most recently admitted request is preempted by recompute: its blocks are freed,
and it goes back to the head of the queue (its prefix blocks often still hit the cache when it returns).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from thrifty.engine.block_manager import BlockManager
from thrifty.engine.prefill_budget import PrefillBudget
from thrifty.engine.sequence import Sequence, Status
from thrifty.errors import InvalidRequestError

POLICIES = ("continuous", "static", "bucketed")


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    policy: str = "continuous"
    batch_timeout_s: float = 0.1        # static/bucketed: launch a partial batch after this wait
    bucket_width: int = 64              # bucketed: prompt lengths grouped in buckets this wide
    max_decode_slowdown: float | None = None  # continuous: see the module doc; None: prefill at the full budget

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidRequestError(f"unknown scheduler_policy '{self.policy}'", f"use one of {', '.join(POLICIES)}",
                                      param="scheduler_policy")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be >= 1", "raise them",
                                      param="max_num_seqs")
        if self.max_decode_slowdown is not None and self.max_decode_slowdown <= 1.0:
            raise InvalidRequestError(f"max_decode_slowdown must be > 1, got {self.max_decode_slowdown}",
                                      "use e.g. 2.0, or null to prefill at the full token budget",
                                      param="max_decode_slowdown")


@dataclass(slots=True)
class SchedulerOutput:
    num_tokens: dict[str, int] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens.values())


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # in the order they were admitted
        fair = config.policy == "continuous" and config.max_decode_slowdown is not None
        self.prefill_budget = PrefillBudget(config.max_decode_slowdown) if fair else None

    # ---- queue -------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.blocks.free(request_id)
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- policy ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.config.policy != "continuous":
            if not self.running:
                self._launch_batch()
            self._schedule_running(out, budget, list(self.running), budget)
            return out
        decoding = [seq for seq in self.running if not _prefilling(seq)]
        started = sorted((seq for seq in self.running if _prefilling(seq)), key=_remaining)
        budget = self._schedule_running(out, budget, decoding, budget)
        cap = budget
        if self.prefill_budget is not None and decoding:
            cap = min(budget, self.prefill_budget.tokens())
        if not out.preempted:
            budget, cap = self._admit(out, budget, cap)
        self._schedule_running(out, budget, [seq for seq in started if seq.status is Status.RUNNING], cap)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, queue: list[Sequence], cap: int) -> int:
        """Give each of `queue` (running requests, in turn) its tokens this step; prompt tokens at most `cap`
        in all. Out of blocks: the newest admitted request not yet given tokens this step is preempted."""
        for seq in queue:
            limit = min(budget, cap) if _prefilling(seq) else budget
            if limit == 0 or seq.status is not Status.RUNNING:   # preempted earlier in this step
                continue
            n = self._allocate(seq, limit)
            while n is None:
                victim = self._newest_unscheduled(out, seq)
                self._preempt(victim, out)
                if victim is seq:
                    break
                n = self._allocate(seq, limit)
            if n is None:
                continue
            out.num_tokens[seq.request_id] = n
            budget -= n
            if _prefilling(seq):
                cap -= n
        return budget

    def _newest_unscheduled(self, out: SchedulerOutput, seq: Sequence) -> Sequence:
        later = [s for s in self.running if s.request_id not in out.num_tokens and s is not seq]
        newer = [s for s in later if self.running.index(s) > self.running.index(seq)]
        return newer[-1] if newer else seq

    def _admit(self, out: SchedulerOutput, budget: int, cap: int) -> tuple[int, int]:
        while self.waiting and min(budget, cap) > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self._allocate(seq, min(budget, cap))
            if n is None:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.num_tokens[seq.request_id] = n
            budget -= n
            cap -= n
        return budget, cap

    def _launch_batch(self) -> None:
        """static / bucketed: move the next batch to running once it is full or its oldest request waited enough."""
        if not self.waiting:
            return
        size = self.config.max_num_seqs
        candidates = list(self.waiting)
        if self.config.policy == "bucketed":
            bucket = self._bucket(candidates[0])
            candidates = [s for s in candidates if self._bucket(s) == bucket]
        waited = time.monotonic() - self.waiting[0].arrival_time
        if len(candidates) < size and waited < self.config.batch_timeout_s:
            return
        for seq in candidates[:size]:
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def _bucket(self, seq: Sequence) -> int:
        return seq.num_prompt_tokens // self.config.bucket_width

    # ---- mechanism ---------------------------------------------------------------------------------
    def _allocate(self, seq: Sequence, budget: int) -> int | None:
        """Take blocks for this step's tokens of `seq`; the number of tokens, or None when blocks ran out."""
        first = not self.blocks.has_request(seq.request_id)
        base = self.blocks.get_prefix_hits(seq.token_ids, seq.extra_key) if first else seq.num_computed_tokens
        n = min(seq.num_tokens + len(seq.draft_token_ids) - base, budget)
        hits = self.blocks.allocate(seq.request_id, seq.token_ids, n, seq.extra_key)
        if hits is None and seq.draft_token_ids:    # speculative drafts never cost a preemption
            seq.draft_token_ids = []
            return self._allocate(seq, budget)
        if hits is None:
            return None
        if seq.draft_token_ids:                      # the budget may cut the drafts short
            del seq.draft_token_ids[max(0, n - seq.num_uncomputed_tokens):]
        if first:
            seq.num_computed_tokens = hits
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = hits
        return n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq.request_id)
        out.num_tokens.pop(seq.request_id, None)


def _remaining(seq: Sequence) -> int:
    return seq.num_tokens - seq.num_computed_tokens


def _prefilling(seq: Sequence) -> bool:
    """More than the one new token of a decode step is left to compute: a prompt (or a preempted request's
    prompt and output, recomputed)."""
    return _remaining(seq) > 1
