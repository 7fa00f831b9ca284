"""Paged KV-cache bookkeeping: blocks, ref counts, block tables, prefix caching with LRU eviction.

Pure Python and no torch: this class only decides *which* physical block holds which tokens of which
request. `kv_cache.py` owns the tensors; the scheduler decides who runs; the block manager keeps books.

Prefix caching. Every full block of a request is keyed by a hash chain,
``h_i = H(h_{i-1}, tokens of block i, extra_key if i == 0)``, so a key names the whole prefix up to the
end of its block (and the tenant/adapter salt in `extra_key`, which the chain carries to every later
block). A later request whose prompt starts with the same blocks reuses them instead of recomputing.

LRU eviction comes for free: a block whose ref count drops to 0 goes to the *end* of the free queue but
keeps its hash, so it can still be hit. New blocks are taken from the *front*, and only then is the hash
dropped. The free queue order is therefore the eviction order, least recently freed first.

Sliding windows. A manager built with `window` keeps the blocks of layers that attend only to the last
`window` tokens (Gemma 3's local layers; engine/kv_groups.py gives them their own manager and KV tensors).
Once a step's tokens are computed, blocks wholly before the window of the next query are released (to the
free queue's end, keeping their keys: LRU as above) and their table entries point at `null_block`, one extra
block past the pool that is never written and never read unmasked. A request then holds at most
window + one block (plus the chunk a step is computing). A prefix hit on such a manager needs only the blocks
that cover the window before the hit point; earlier ones come back as `null_block`.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockHash = bytes


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: str | None
) -> BlockHash:
    """Stable 256-bit key of one full block given its parent's key.

    Python's built-in `hash` is salted per process, so keys would not survive a restart or match across
    engine replicas (prefix-affinity routing); blake2b over an unambiguous byte encoding does.
    Module-level so tests can replace it (e.g. with a constant) to exercise the collision guard.
    """
    h = hashlib.blake2b(digest_size=32)
    # Tag + length prefixes keep the encoding unambiguous: (None, ...) never equals (b"", ...).
    if parent_hash is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + len(parent_hash).to_bytes(2, "little") + parent_hash)
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra_key is None:
        h.update(b"\x00")
    else:
        raw = extra_key.encode("utf-8")
        h.update(b"\x01" + len(raw).to_bytes(4, "little") + raw)
    return h.digest()


@dataclass(slots=True)
class Block:
    """One physical KV block.

    `block_hash` is set iff the block is in the prefix index (and then the index maps that hash to this
    block). `token_ids`, `parent_hash` and `extra_key` are the full key behind the hash, kept so a lookup
    can verify a hit instead of trusting the hash alone.
    """

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None
    parent_hash: BlockHash | None = None
    extra_key: str | None = None

    def matches(
        self, parent_hash: BlockHash | None, token_ids: tuple[int, ...], extra_key: str | None
    ) -> bool:
        """Whether this block's stored key is exactly the one looked up (the collision guard)."""
        return (
            self.token_ids == token_ids
            and self.parent_hash == parent_hash
            and self.extra_key == extra_key
        )

    def set_key(
        self,
        block_hash: BlockHash,
        parent_hash: BlockHash | None,
        token_ids: tuple[int, ...],
        extra_key: str | None,
    ) -> None:
        self.block_hash = block_hash
        self.parent_hash = parent_hash
        self.token_ids = token_ids
        self.extra_key = extra_key

    def clear_key(self) -> None:
        self.block_hash = None
        self.parent_hash = None
        self.token_ids = None
        self.extra_key = None


@dataclass(slots=True)
class PrefixCacheStats:
    """Counters since construction. `queries`/`hits` are in tokens, `evictions` in blocks."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(slots=True)
class _RequestBlocks:
    """What the manager knows about one request that holds blocks."""

    block_ids: list[int]
    # Tokens the table was sized for so far: computed plus scheduled. The base of the next allocate().
    num_tokens: int
    # Prefix-hit tokens found at the first allocation (reported as cached prompt tokens in usage).
    num_cached_tokens: int
    # Salt of the first block's key; cache_full_blocks() needs it to continue the chain.
    extra_key: str | None
    # Chain hash of each full block hashed so far (hits, then cached ones), in table order. It includes
    # duplicates that stayed out of the index, because later blocks chain from them all the same.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Leading table entries released out of the sliding window (they point at the null block).
    num_dropped: int = 0


@dataclass(slots=True)
class _Plan:
    """What an allocate() would do, decided before anything changes."""

    req: _RequestBlocks | None
    hit_ids: list[int]
    hit_hashes: list[BlockHash]
    num_tokens: int
    num_fresh: int


class BlockManager:
    """Books for a paged KV cache of `num_blocks` blocks of `block_size` token slots each (and, with a sliding
    `window`, the null block `num_blocks` besides: the KV tensors then hold num_blocks + 1 blocks)."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 window: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self.null_block: int | None = num_blocks if window is not None else None
        self.stats = PrefixCacheStats()
        self._blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, front = next to hand out (= next to evict). OrderedDict for O(1)
        # removal from the middle when a prefix hit revives a free block.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Prefix index: chain hash -> the one block holding that content.
        self._index: dict[BlockHash, int] = {}
        self._requests: dict[str, _RequestBlocks] = {}

    # ----------------------------------------------------------------------------------- queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, cached-but-unreferenced ones included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some request."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks a table needs to hold `num_tokens` tokens; > num_blocks means it can never fit."""
        return -(-num_tokens // self.block_size)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty for a request that holds no blocks)."""
        req = self._requests.get(request_id)
        return list(req.block_ids) if req is not None else []

    def num_cached_tokens(self, request_id: str) -> int:
        """Prefix-hit tokens found at the request's first allocation (0 if unknown)."""
        req = self._requests.get(request_id)
        return req.num_cached_tokens if req is not None else 0

    def num_allocated_tokens(self, request_id: str) -> int:
        """Tokens the request's table was sized for so far (computed + scheduled), 0 if unknown."""
        req = self._requests.get(request_id)
        return req.num_tokens if req is not None else 0

    def get_prefix_hits(self, token_ids: Sequence[int], extra_key: str | None = None) -> int:
        """Prefix-hit tokens a first allocate() of these tokens would find now. Changes nothing.

        Lets a scheduler size the first chunk as `prompt_len - hits` before allocating.
        """
        return self.cached_prefix_blocks(token_ids, extra_key) * self.block_size

    def cached_prefix_blocks(self, token_ids: Sequence[int], extra_key: str | None = None,
                             max_blocks: int | None = None) -> int:
        """Blocks a first allocate() with `max_hit_blocks=max_blocks` would take from the prefix cache now."""
        return len(self._match_prefix(token_ids, extra_key, max_blocks)[0])

    def first_needed_block(self, num_tokens: int) -> int:
        """Table index of the oldest block the next query (at position num_tokens) may attend to."""
        if self.window is None:
            return 0
        return max(0, num_tokens - self.window + 1) // self.block_size

    @property
    def num_held_blocks(self) -> int:
        """Blocks some request holds now (the KV memory in use)."""
        return self.num_blocks - len(self._free)

    # ----------------------------------------------------------------------------------- updates

    def allocate(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_new_tokens: int,
        extra_key: str | None = None,
        num_computed_tokens: int | None = None,
        max_hit_blocks: int | None = None,
    ) -> int | None:
        """Grow the request's table to cover its computed tokens plus `num_new_tokens`.

        First call (no table yet): look up the prefix cache and take the hit blocks (at most `max_hit_blocks`:
        managers of one model agree on one hit, engine/kv_groups.py); the base is then the hit tokens.
        Later calls: the base is the tokens covered by earlier calls, or `num_computed_tokens`
        when given (speculative decoding, where rejected draft tokens must not count; ignored on the first
        call). Returns the prefix-hit tokens on the first call, 0 later, or None when the free blocks do
        not suffice, in which case nothing at all has changed.
        """
        plan = self._plan(request_id, token_ids, num_new_tokens, extra_key, num_computed_tokens, max_hit_blocks)
        return None if plan is None else self._commit(request_id, plan, token_ids, extra_key)

    def can_allocate(self, request_id: str, token_ids: Sequence[int], num_new_tokens: int,
                     extra_key: str | None = None, num_computed_tokens: int | None = None,
                     max_hit_blocks: int | None = None) -> bool:
        """Whether the same allocate() would succeed now. Changes nothing."""
        return self._plan(request_id, token_ids, num_new_tokens, extra_key, num_computed_tokens,
                          max_hit_blocks) is not None

    def _plan(self, request_id: str, token_ids: Sequence[int], num_new_tokens: int, extra_key: str | None,
              num_computed_tokens: int | None, max_hit_blocks: int | None) -> _Plan | None:
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        req = self._requests.get(request_id)
        if req is None:
            hit_ids, hit_hashes = self._match_prefix(token_ids, extra_key, max_hit_blocks)
            num_held = len(hit_ids)
            base = num_held * self.block_size
        else:
            hit_ids, hit_hashes = [], []
            num_held = len(req.block_ids)
            base = req.num_tokens if num_computed_tokens is None else num_computed_tokens
        num_tokens = base + num_new_tokens
        num_fresh = max(self.blocks_needed(num_tokens) - num_held, 0)
        # Hit blocks that sit in the free queue leave it too, so they compete with fresh blocks.
        num_revived = sum(1 for b in hit_ids if b != self.null_block and self._blocks[b].ref_count == 0)
        if num_fresh + num_revived > len(self._free):
            return None
        return _Plan(req, hit_ids, hit_hashes, num_tokens, num_fresh)

    def _commit(self, request_id: str, plan: _Plan, token_ids: Sequence[int], extra_key: str | None) -> int:
        # Nothing can fail from here on. Hits first, so taking fresh blocks cannot evict them.
        req = plan.req
        if req is None:
            for block_id in plan.hit_ids:
                if block_id != self.null_block:
                    self._ref(block_id)
            base = len(plan.hit_ids) * self.block_size
            req = _RequestBlocks(
                block_ids=list(plan.hit_ids),
                num_tokens=0,
                num_cached_tokens=base,
                extra_key=extra_key,
                block_hashes=plan.hit_hashes,
                num_dropped=sum(1 for b in plan.hit_ids if b == self.null_block),
            )
            self._requests[request_id] = req
            if self.enable_prefix_caching:
                self.stats.queries += len(token_ids)
                self.stats.hits += base
            result = base
        else:
            result = 0
        req.block_ids.extend(self._take_free_block() for _ in range(plan.num_fresh))
        req.num_tokens = plan.num_tokens
        return result

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Index every block of the request that became full once `num_computed_tokens` have KV; with a
        sliding window, then release the blocks the next query can no longer see.

        Call after the model step that computed them. If another block already holds the same key,
        that one stays the cached copy and this duplicate stays out of the index (it is freed plainly).
        Unknown requests are ignored (an abort may have raced with the step).
        """
        req = self._requests.get(request_id)
        if req is None:
            return
        if self.enable_prefix_caching:
            self._index_full_blocks(request_id, req, token_ids, num_computed_tokens)
        self._drop_outside_window(req, min(num_computed_tokens, req.num_tokens))

    def _index_full_blocks(self, request_id: str, req: _RequestBlocks, token_ids: Sequence[int],
                           num_computed_tokens: int) -> None:
        bs = self.block_size
        num_full = min(num_computed_tokens, len(token_ids)) // bs
        if num_full > len(req.block_ids):
            raise ValueError(
                f"request {request_id!r}: {num_computed_tokens} computed tokens but only "
                f"{len(req.block_ids)} blocks allocated"
            )
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), num_full):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            key_extra = req.extra_key if i == 0 else None
            block_hash = hash_block_tokens(parent, tokens, key_extra)
            req.block_hashes.append(block_hash)
            block = self._blocks[req.block_ids[i]]   # never the null block: hashing comes before dropping
            if block_hash not in self._index and block.block_hash is None:
                block.set_key(block_hash, parent, tokens, key_extra)
                self._index[block_hash] = block.block_id
            parent = block_hash

    def _drop_outside_window(self, req: _RequestBlocks, num_computed_tokens: int) -> None:
        """Release the leading blocks no query from position `num_computed_tokens` on attends to."""
        keep_from = min(self.first_needed_block(num_computed_tokens), len(req.block_ids))
        for i in range(req.num_dropped, keep_from):
            self._release(req.block_ids[i])
            req.block_ids[i] = self.null_block
        req.num_dropped = max(req.num_dropped, keep_from)

    def _release(self, block_id: int, front: bool = False) -> None:
        """Drop one reference; an unreferenced block joins the free queue (at the front: nothing worth caching)."""
        if block_id == self.null_block:
            return
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if front:
                self._free.move_to_end(block_id, last=False)

    def free(self, request_id: str) -> None:
        """Release the request's blocks; cached ones stay findable until handed out again.

        The table is released tail first, so within one sequence the tail is evicted before the head
        (a later request is far likelier to share the head). Unknown ids are a no-op (abort vs finish).
        """
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for block_id in reversed(req.block_ids):
            self._release(block_id)

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Shrink the request's table to `num_tokens` tokens (speculative decoding: the rejected drafts' slots).

        Blocks past the last one still needed are released to the *front* of the free queue: they hold
        nothing worth caching, so they are handed out again before any cached block is evicted. Blocks
        already in the prefix index are never released here (they hold only verified tokens).
        """
        req = self._requests.get(request_id)
        if req is None:
            return
        if num_tokens < len(req.block_hashes) * self.block_size:
            raise ValueError(f"request {request_id!r}: cannot trim below its {len(req.block_hashes)} cached blocks")
        keep = self.blocks_needed(num_tokens)
        while len(req.block_ids) > keep:
            self._release(req.block_ids.pop(), front=True)
        req.num_dropped = min(req.num_dropped, len(req.block_ids))
        req.num_tokens = min(req.num_tokens, num_tokens)

    def reset_prefix_cache(self) -> None:
        """Forget every cached key (e.g. after new weights are loaded). Tables and ref counts stay."""
        for block_id in self._index.values():
            self._blocks[block_id].clear_key()
        self._index.clear()

    # ---------------------------------------------------------------------------------- internals

    def _match_prefix(
        self, token_ids: Sequence[int], extra_key: str | None, max_blocks: int | None = None
    ) -> tuple[list[int], list[BlockHash]]:
        """Longest run of cached full blocks that prefixes `token_ids`: (block ids, chain hashes), at most
        `max_blocks`. With a window, the longest prefix whose blocks the next query sees are all cached (the
        ones before come back as the null block).

        Never includes the block holding the last token: the model must compute at least one token to
        produce logits for the next one.
        """
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        limit = max(len(token_ids) - 1, 0) // bs
        limit = limit if max_blocks is None else min(limit, max_blocks)
        found: list[int | None] = []   # the cached block of each prefix block, None where none is
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for i in range(limit):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            key_extra = extra_key if i == 0 else None
            block_hash = hash_block_tokens(parent, tokens, key_extra)
            block_id = self._index.get(block_hash)
            if block_id is not None and not self._blocks[block_id].matches(parent, tokens, key_extra):
                block_id = None
            if block_id is None and self.window is None:
                break
            found.append(block_id)
            hashes.append(block_hash)
            parent = block_hash
        n = len(found)
        while n and any(b is None for b in found[self.first_needed_block(n * bs):n]):
            n -= 1
        first = self.first_needed_block(n * bs)
        return [self.null_block if i < first else found[i] for i in range(n)], hashes[:n]

    def _ref(self, block_id: int) -> None:
        """Add a reference to a (hit) block, taking it out of the free queue if it was there."""
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        """Hand out the least recently freed block, evicting its cached key if it has one."""
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.block_hash is not None:
            del self._index[block.block_hash]
            block.clear_key()
            self.stats.evictions += 1
        block.ref_count = 1
        return block_id
