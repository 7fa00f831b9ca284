"""KV groups: layers that keep their KV the same way share one block manager and one pool of KV blocks.

A model whose layers all see their whole context (Qwen2) has one group: one block table per request, as
always. Gemma 3 has two: its global layers keep every block; its local (sliding-window) layers keep only the
blocks inside the window (engine/block_manager.py `window`), so their blocks are freed as decoding goes on.
Each group has its own block table per request and its own KV tensors, sized apart (`group_specs`). The
design and why: docs/ARCHITECTURE.md, "Sliding-window KV".

`GroupedBlockManager` gives the scheduler and engine the BlockManager interface over all groups: an allocate
succeeds in every group or changes nothing, and a prefix hit is one length that every group can serve.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from thrifty.engine.block_manager import BlockManager, PrefixCacheStats
from thrifty.engine.kv_cache import KVCacheSpec, PagedKVCache, block_bytes
from thrifty.errors import InvalidRequestError
from thrifty.models.config import ModelConfig
from thrifty.ops.kv_cache import LayerKVCache

GIB = 1024 ** 3


@dataclass(slots=True, frozen=True)
class KVGroup:
    window: int | None           # None: the layers see their whole context
    layers: tuple[int, ...]


def kv_groups(config: ModelConfig, free_window_blocks: bool = True) -> list[KVGroup]:
    """The model's layers grouped by window, whole-context layers first; one group when no layer has a window
    or when `free_window_blocks` is off (every layer then keeps every block, the unbounded reference)."""
    windows = config.layer_windows
    if not free_window_blocks or all(w is None for w in windows):
        return [KVGroup(None, tuple(range(config.num_layers)))]
    keys = sorted(set(windows), key=lambda w: -1 if w is None else w)
    return [KVGroup(w, tuple(i for i, lw in enumerate(windows) if lw == w)) for w in keys]


def window_blocks(window: int, block_size: int) -> int:
    """Most blocks a request holds in a window group between steps: the window, misaligned, plus the block
    the next token goes to."""
    return math.ceil((window - 1) / block_size) + 2


def group_specs(config: ModelConfig, groups: list[KVGroup], memory_gib: float, block_size: int,
                dtype: torch.dtype, num_blocks: int | None, max_num_seqs: int,
                max_num_batched_tokens: int) -> list[KVCacheSpec]:
    """Block counts per group. A window group gets what max_num_seqs requests hold between steps plus one
    step's tokens in flight (never more than full attention would take) and its null block; whole-context
    groups share the rest of the budget. `num_blocks` (tests, benchmarks) is the block count of a whole-context
    group; window groups are then sized as above."""
    bytes_per = [block_bytes(len(g.layers), config.num_kv_heads, config.head_dim, block_size, dtype) for g in groups]
    unified = num_blocks if num_blocks is not None else int(memory_gib * GIB) // sum(bytes_per)
    counts: list[int] = []
    for g in groups:
        if g.window is None:
            counts.append(0)
            continue
        demand = max_num_seqs * window_blocks(g.window, block_size) + math.ceil(max_num_batched_tokens / block_size)
        counts.append(min(demand, max(unified, 1)) + 1)   # + the null block
    spent = sum(c * b for c, b in zip(counts, bytes_per))
    whole = [i for i, g in enumerate(groups) if g.window is None]
    for i in whole:
        counts[i] = num_blocks if num_blocks is not None else \
            int(memory_gib * GIB - spent) // sum(bytes_per[j] for j in whole)
    if any(n < (1 if g.window is None else 2) for g, n in zip(groups, counts)):
        raise InvalidRequestError(f"kv_cache_memory={memory_gib} GiB holds no {block_size}-token block in every "
                                  "KV group", "raise kv_cache_memory", param="kv_cache_memory")
    return [KVCacheSpec(len(g.layers), config.num_kv_heads, config.head_dim, block_size, n, dtype)
            for g, n in zip(groups, counts)]


class GroupedKVCache:
    """The KV tensors of every group; `layers[i]` is model layer i's storage (in its group's pool)."""

    def __init__(self, groups: list[KVGroup], specs: list[KVCacheSpec], device: torch.device | str = "cpu",
                 k_transform: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.groups, self.specs = groups, specs
        self.caches = [PagedKVCache(spec, device, None if k_transform is None
                                    else tuple(t[list(group.layers)] for t in k_transform))
                       for group, spec in zip(groups, specs)]
        num_layers = sum(len(g.layers) for g in groups)
        self.layers: list[LayerKVCache] = [None] * num_layers  # type: ignore[list-item]
        self.layer_group = [0] * num_layers
        for gi, (group, cache) in enumerate(zip(groups, self.caches)):
            for slot, layer in enumerate(group.layers):
                self.layers[layer] = cache.layers[slot]
                self.layer_group[layer] = gi

    @property
    def spec(self) -> KVCacheSpec:
        """The first group's: whole-context layers where the model has any (it bounds the context)."""
        return self.specs[0]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


class GroupedBlockManager:
    """One BlockManager per KV group behind the BlockManager interface the scheduler and engine use.

    `block_table` is the first group's; the runner takes every group's from `block_tables`. Prefix-cache
    statistics are the first group's (all groups take the same hits)."""

    def __init__(self, managers: list[BlockManager]) -> None:
        self.managers = managers
        self.block_size = managers[0].block_size
        self.enable_prefix_caching = managers[0].enable_prefix_caching

    # ---- queries
    @property
    def stats(self) -> PrefixCacheStats:
        return self.managers[0].stats

    @stats.setter
    def stats(self, value: PrefixCacheStats) -> None:
        self.managers[0].stats = value

    @property
    def num_blocks(self) -> int:
        return sum(m.num_blocks for m in self.managers)

    @property
    def num_free_blocks(self) -> int:
        return sum(m.num_free_blocks for m in self.managers)

    @property
    def usage(self) -> float:
        """The fullest group's: the one that runs out first."""
        return max(m.usage for m in self.managers)

    def blocks_needed(self, num_tokens: int) -> int:
        return self.managers[0].blocks_needed(num_tokens)

    def has_request(self, request_id: str) -> bool:
        return self.managers[0].has_request(request_id)

    def block_table(self, request_id: str) -> list[int]:
        return self.managers[0].block_table(request_id)

    def block_tables(self, request_id: str) -> list[list[int]]:
        return [m.block_table(request_id) for m in self.managers]

    def num_cached_tokens(self, request_id: str) -> int:
        return self.managers[0].num_cached_tokens(request_id)

    def num_allocated_tokens(self, request_id: str) -> int:
        return self.managers[0].num_allocated_tokens(request_id)

    def get_prefix_hits(self, token_ids: Sequence[int], extra_key: str | None = None) -> int:
        return self._hit_blocks(token_ids, extra_key) * self.block_size

    def _hit_blocks(self, token_ids: Sequence[int], extra_key: str | None) -> int:
        """The longest hit every group can serve: each group's hit shrinks the cap of the next until none does."""
        n = self.managers[0].cached_prefix_blocks(token_ids, extra_key)
        while True:
            smallest = min(m.cached_prefix_blocks(token_ids, extra_key, n) for m in self.managers)
            if smallest == n:
                return n
            n = smallest

    # ---- updates
    def allocate(self, request_id: str, token_ids: Sequence[int], num_new_tokens: int,
                 extra_key: str | None = None, num_computed_tokens: int | None = None) -> int | None:
        """As BlockManager.allocate, in every group or in none."""
        hits = None if self.has_request(request_id) else self._hit_blocks(token_ids, extra_key)
        args = (request_id, token_ids, num_new_tokens, extra_key, num_computed_tokens, hits)
        if not all(m.can_allocate(*args) for m in self.managers):
            return None
        results = [m.allocate(*args) for m in self.managers]
        return results[0]

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        for m in self.managers:
            m.cache_full_blocks(request_id, token_ids, num_computed_tokens)

    def free(self, request_id: str) -> None:
        for m in self.managers:
            m.free(request_id)

    def trim(self, request_id: str, num_tokens: int) -> None:
        for m in self.managers:
            m.trim(request_id, num_tokens)

    def reset_prefix_cache(self) -> None:
        for m in self.managers:
            m.reset_prefix_cache()


def build(config: ModelConfig, groups: list[KVGroup], specs: list[KVCacheSpec], enable_prefix_caching: bool,
          device: torch.device | str, k_transform: tuple[torch.Tensor, torch.Tensor] | None = None,
          scratch_block: bool = False) -> tuple[PagedKVCache | GroupedKVCache, BlockManager | GroupedBlockManager]:
    """The KV tensors and their books: the plain pair for one whole-context group, grouped ones otherwise.
    `k_transform`: an int8 / fp8 cache's K shift and divisor for every model layer (engine/kv_calibration.py);
    `scratch_block`: the plain pair gets a block for CUDA-graph padding rows (engine/cuda_graphs.py)."""
    if len(groups) == 1 and groups[0].window is None:
        spec = specs[0]
        return (PagedKVCache(spec, device, k_transform, scratch_block),
                BlockManager(spec.num_blocks, spec.block_size, enable_prefix_caching))
    managers = [BlockManager(s.num_blocks - (1 if g.window is not None else 0), s.block_size, enable_prefix_caching,
                             g.window) for g, s in zip(groups, specs)]
    return GroupedKVCache(groups, specs, device, k_transform), GroupedBlockManager(managers)


def held_kv_bytes(block_manager: BlockManager | GroupedBlockManager, kv_cache: PagedKVCache | GroupedKVCache) -> int:
    """Bytes of KV that requests hold now, counted from the block managers."""
    if isinstance(block_manager, GroupedBlockManager):
        return sum(m.num_held_blocks * s.bytes_per_block for m, s in zip(block_manager.managers, kv_cache.specs))
    return block_manager.num_held_blocks * kv_cache.spec.bytes_per_block
