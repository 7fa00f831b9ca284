"""A frozen view of an engine's state, for readers on other threads (the server's /metrics, /health and its
admission count): taken on the engine's own thread after each step, read without touching the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thrifty.engine.engine import LLMEngine


@dataclass(slots=True, frozen=True)
class EngineSnapshot:
    num_running: int                 # sequences in the running batch
    num_waiting: int                 # added, not yet scheduled
    kv_blocks_total: int
    kv_blocks_free: int              # cached-but-unreferenced blocks count as free
    prefix_cache_queries: int        # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int
    max_model_len: int
    spec_num_drafts: int = 0         # speculative decoding (vLLM's spec_decode names): verifications with drafts
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()   # drafts kept at position 0, 1, ... of a proposal
    prefill_tokens_per_s: float | None = None     # the engine's measured prefill rate (None: unknown yet)
    prefilling: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens still to prefill

    @staticmethod
    def of(engine: LLMEngine) -> EngineSnapshot:
        """Call only where the engine is not stepping (its own thread, or before it runs)."""
        bm, sched = engine.block_manager, engine.scheduler
        spec = engine.speculator.stats if engine.speculator is not None else None
        prefill = {"prefill_tokens_per_s": engine.prefill_rate.tokens_per_s(), "prefilling": {
            seq.request_id: seq.num_prompt_tokens - seq.num_computed_tokens for queue in (sched.running, sched.waiting)
            for seq in queue if seq.num_computed_tokens < seq.num_prompt_tokens}}
        if spec is None:
            return EngineSnapshot(len(sched.running), len(sched.waiting), bm.num_blocks, bm.num_free_blocks,
                                  bm.stats.queries, bm.stats.hits, engine.max_model_len, **prefill)
        return EngineSnapshot(len(sched.running), len(sched.waiting), bm.num_blocks, bm.num_free_blocks,
                              bm.stats.queries, bm.stats.hits, engine.max_model_len, spec.num_drafts,
                              spec.num_draft_tokens, spec.num_accepted_tokens, tuple(spec.accepted_per_pos), **prefill)
