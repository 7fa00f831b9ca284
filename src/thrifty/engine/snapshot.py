"""A frozen view of an engine's state, for readers on other threads (the server's /metrics, /health and its
admission count): taken on the engine's own thread after each step, read without touching the engine."""
from __future__ import annotations

from dataclasses import dataclass
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

    @staticmethod
    def of(engine: LLMEngine) -> EngineSnapshot:
        """Call only where the engine is not stepping (its own thread, or before it runs)."""
        bm, sched = engine.block_manager, engine.scheduler
        return EngineSnapshot(len(sched.running), len(sched.waiting), bm.num_blocks, bm.num_free_blocks,
                              bm.stats.queries, bm.stats.hits, engine.max_model_len)
