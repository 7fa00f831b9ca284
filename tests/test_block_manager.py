"""BlockManager: unit tests of allocation, prefix caching and LRU eviction, plus a Hypothesis state
machine that checks the book-keeping invariants (and that prefix hits only ever reuse KV computed for
exactly the same prefix) after every step."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from thrifty.engine import block_manager as bm_module
from thrifty.engine.block_manager import BlockManager

BS = 4


def snapshot(bm: BlockManager) -> dict[str, Any]:
    """Everything the manager holds, deep-copied, so a before/after comparison catches any change."""
    return copy.deepcopy(
        {
            "blocks": bm._blocks,
            "free": list(bm._free),
            "index": bm._index,
            "requests": bm._requests,
            "stats": bm.stats,
        }
    )


def prefill(bm: BlockManager, rid: str, tokens: list[int], extra_key: str | None = None) -> int:
    """Allocate and 'compute' a whole prompt in one step, then cache its full blocks."""
    hits = bm.allocate(rid, tokens, len(tokens) - bm.get_prefix_hits(tokens, extra_key), extra_key)
    assert hits is not None
    bm.cache_full_blocks(rid, tokens, len(tokens))
    return hits


# ---------------------------------------------------------------------------------------- units


def test_table_grows_by_block_boundaries() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(100, 105))
    assert bm.allocate("a", tokens, 3) == 0
    assert len(bm.block_table("a")) == 1
    assert bm.allocate("a", tokens, 1) == 0  # 4 tokens: still one block
    assert len(bm.block_table("a")) == 1
    assert bm.allocate("a", tokens, 1) == 0  # 5 tokens: a second block
    assert len(bm.block_table("a")) == 2
    assert bm.num_allocated_tokens("a") == 5
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(2 / 8)
    assert bm.allocate("a", tokens, 0) == 0
    assert len(bm.block_table("a")) == 2
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(4) == 1 and bm.blocks_needed(5) == 2


def test_block_table_is_a_copy() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    bm.allocate("a", [1, 2], 2)
    bm.block_table("a").append(99)
    assert bm.block_table("a") == [0]
    assert bm.block_table("unknown") == [] and bm.num_cached_tokens("unknown") == 0


def test_speculative_base_override() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    bm.allocate("a", [1, 2, 3], 3)
    bm.allocate("a", [1, 2, 3], 4)  # 3 draft tokens + 1: 7 slots
    assert len(bm.block_table("a")) == 2
    # Only one draft token was accepted: 5 computed, next step again k + 1 = 4 -> 9 slots, 3 blocks.
    bm.allocate("a", [1, 2, 3, 4, 5], 4, num_computed_tokens=5)
    assert bm.num_allocated_tokens("a") == 9 and len(bm.block_table("a")) == 3


def test_failed_allocate_changes_nothing() -> None:
    bm = BlockManager(num_blocks=5, block_size=BS)
    shared = list(range(8))
    prefill(bm, "a", shared + [50])  # 3 blocks, the first two cached
    bm.free("a")  # cached blocks now sit in the free queue
    bm.allocate("b", [7, 7, 7], 3)
    before = snapshot(bm)
    # 18 tokens: 2 cached blocks hit (both must leave the free queue) + 3 fresh = 5 > 4 free blocks.
    assert bm.allocate("c", shared + list(range(60, 70)), 10) is None
    assert snapshot(bm) == before
    assert bm.allocate("b", [7, 7, 7], 100) is None  # growing an existing table
    assert snapshot(bm) == before
    assert not bm.has_request("c")


def test_prefix_hit_after_another_request_cached() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(10))  # blocks [0..3], [4..7], partial [8, 9]
    assert prefill(bm, "a", prompt) == 0
    table_a = bm.block_table("a")
    other = prompt[:8] + [42, 43, 44]
    assert bm.get_prefix_hits(other) == 8
    assert bm.allocate("b", other, 3) == 8
    assert bm.num_cached_tokens("b") == 8
    table_b = bm.block_table("b")
    assert table_b[:2] == table_a[:2] and table_b[2] not in table_a
    assert all(bm._blocks[b].ref_count == 2 for b in table_a[:2])
    assert bm.stats.hits == 8 and bm.stats.queries == len(prompt) + len(other)
    # A hit on freed blocks revives them out of the free queue.
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 10
    assert bm.allocate("c", prompt, 2) == 8
    assert bm.num_free_blocks == 7


def test_hit_capped_so_last_token_is_computed() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(8))  # exactly two full blocks
    prefill(bm, "a", prompt)
    assert len(bm._index) == 2
    # Same 8 tokens: the block holding the last token must be recomputed -> only 4 hit tokens.
    assert bm.allocate("b", prompt, 4) == 4
    # One more token: both full blocks may be reused.
    assert bm.allocate("c", prompt + [9], 1) == 8
    assert bm.get_prefix_hits(prompt[:1]) == 0 and bm.get_prefix_hits([]) == 0


def test_extra_key_isolates() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(9))
    prefill(bm, "a", prompt, extra_key="tenant-a")
    assert bm.allocate("b", prompt, 1, extra_key="tenant-b") == 0
    assert bm.allocate("c", prompt, 1) == 0
    assert bm.allocate("d", prompt, 1, extra_key="tenant-a") == 8


def test_collision_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "hash_block_tokens", lambda parent, tokens, extra: b"same")
    bm = BlockManager(num_blocks=10, block_size=BS)
    prefill(bm, "a", [1, 2, 3, 4, 5])
    assert bm.allocate("b", [9, 9, 9, 9, 5], 5) == 0  # same hash, other tokens: no hit
    assert bm.allocate("c", [1, 2, 3, 4, 5], 1, extra_key="x") == 0  # same tokens, other salt
    assert bm.allocate("d", [1, 2, 3, 4, 5], 1) == 4  # the genuine match still hits


def test_duplicate_content_keeps_first_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate("a", prompt, 5)
    bm.allocate("b", prompt, 5)  # nothing cached yet: computes the same block again
    bm.cache_full_blocks("a", prompt, 5)
    bm.cache_full_blocks("b", prompt, 5)
    first_a, first_b = bm.block_table("a")[0], bm.block_table("b")[0]
    assert list(bm._index.values()) == [first_a]
    assert bm._blocks[first_b].block_hash is None
    bm.free("a")
    bm.free("b")
    assert bm.allocate("c", prompt, 1) == 4 and bm.block_table("c")[0] == first_a


def test_lru_evicts_least_recently_freed_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    old, new = [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]
    prefill(bm, "old", old)
    prefill(bm, "new", new)
    bm.free("old")
    bm.free("new")
    # Free queue front: the 2 never-used blocks, then old's (tail first), then new's.
    assert bm.allocate("x", [3] * 12, 12) == 0  # 3 blocks: 2 unused + old's partial tail block
    assert bm.stats.evictions == 0
    assert bm.allocate("y", [4] * 4, 4) == 0  # next: old's cached head block
    assert bm.stats.evictions == 1
    assert bm.get_prefix_hits(old) == 0
    assert bm.get_prefix_hits(new) == 4


def test_free_releases_tail_before_head() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(13))
    prefill(bm, "a", prompt)  # 4 blocks, 3 cached
    table = bm.block_table("a")
    bm.free("a")
    assert list(bm._free) == table[::-1]
    bm.allocate("b", [7], 1)  # evicts nothing cached: takes the partial tail block
    assert bm.get_prefix_hits(prompt) == 12
    bm.allocate("c", [7], 1)  # evicts the chain's third block; the first two still hit
    assert bm.get_prefix_hits(prompt) == 8


def test_free_unknown_is_noop() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    bm.allocate("a", [1, 2, 3], 3)
    before = snapshot(bm)
    bm.free("nope")
    bm.cache_full_blocks("nope", [1, 2, 3, 4], 4)
    assert snapshot(bm) == before
    bm.free("a")
    bm.free("a")  # abort racing with finish
    assert bm.num_free_blocks == 4


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    prefill(bm, "a", prompt)
    assert bm._index == {} and all(b.block_hash is None for b in bm._blocks)
    assert bm.allocate("b", prompt, 9) == 0
    assert bm.stats.queries == 0 and bm.stats.hits == 0


def test_reset_prefix_cache() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(9))
    prefill(bm, "a", prompt)
    bm.reset_prefix_cache()
    assert bm._index == {} and bm.get_prefix_hits(prompt) == 0
    bm.free("a")
    assert bm.num_free_blocks == 10


def test_hash_is_stable_and_chained() -> None:
    h = bm_module.hash_block_tokens
    assert h(None, (1, 2), None) == h(None, [1, 2], None)
    assert h(None, (1, 2), None) != h(None, (1, 2), "")
    assert h(h(None, (1,), None), (2,), None) != h(h(None, (3,), None), (2,), None)
    # Fixed value: the key must not depend on the process (no PYTHONHASHSEED salt).
    assert h(None, (1, 2, 3), "k").hex().startswith("ac5c6a409ec32596")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0)
    bm = BlockManager(num_blocks=2, block_size=BS)
    with pytest.raises(ValueError):
        bm.allocate("a", [1], -1)
    bm.allocate("a", [1], 1)
    with pytest.raises(ValueError):
        bm.cache_full_blocks("a", list(range(8)), 8)


def test_window_drops_blocks_and_hits_need_only_the_window() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS, window=6)
    tokens = list(range(100, 125))                     # 25 tokens: 7 blocks
    assert prefill(bm, "a", tokens) == 0
    # the next query (position 25) sees 20..25: block 5 on; blocks 0-4 went back to the pool
    assert bm.first_needed_block(25) == 5
    assert bm.block_table("a")[:5] == [bm.null_block] * 5 and bm.null_block not in bm.block_table("a")[5:]
    assert bm.num_held_blocks == 2
    bm.free("a")
    assert bm.num_free_blocks == bm.num_blocks
    # a hit needs blocks 4..5 for a 24-token prefix (next query at 24 sees 19..24); all are still cached
    assert bm.allocate("b", tokens, 1) == 24
    assert bm.block_table("b")[:4] == [bm.null_block] * 4 and bm.num_held_blocks == 3
    # keys forgotten: nothing hits
    bm.free("b")
    bm.reset_prefix_cache()
    assert bm.get_prefix_hits(tokens) == 0


# ------------------------------------------------------------------------------ state machine

ALPHABET = st.integers(0, 1)  # tiny, so random tails collide too
# Shared "system prompts" (0, 1, 2 and 3 blocks at BS=4) so that multi-block prefix chains repeat.
PREFIXES = st.sampled_from([(), (2, 2, 2, 2), (2, 3, 2, 3, 3, 3, 3, 3), (3, 2, 2, 3, 3, 3, 2, 2, 3, 2, 3, 2)])
PICK = st.integers(0, 1_000)  # which live request a rule acts on


def chain_hash(extra: str | None, prefix: tuple[int, ...]) -> bytes:
    """The key of the last full block of `prefix`, recomputed from scratch."""
    parent = None
    for i in range(0, len(prefix), BS):
        parent = bm_module.hash_block_tokens(parent, prefix[i : i + BS], extra if i == 0 else None)
    assert parent is not None
    return parent


@dataclass
class Req:
    """The test's view of a request, independent of the manager's."""

    tokens: list[int]
    extra: str | None
    started: bool = False
    covered: int = 0  # token slots allocated so far
    computed: int = 0  # tokens whose KV the 'runner' has written


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler + runner would, with a model of what KV each block holds."""

    WINDOW: int | None = None   # the sliding-window machine below sets one

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=12, block_size=BS, window=self.WINDOW)
        self.next_id = 0
        self.live: dict[str, Req] = {}
        self.seen: list[list[int]] = []  # every prompt added, for repeats
        # block id -> (extra_key, prefix tokens through the end of the block) last written into it.
        self.kv: dict[int, tuple[str | None, tuple[int, ...]]] = {}

    def _pick(self, pick: int) -> tuple[str, Req]:
        rid = sorted(self.live)[pick % len(self.live)]
        return rid, self.live[rid]

    # ---- rules

    @initialize(num_blocks=st.integers(5, 14), prefix=PREFIXES,
                tail=st.lists(ALPHABET, min_size=1, max_size=6), keep=st.booleans())
    def warm_cache(self, num_blocks: int, prefix: tuple[int, ...], tail: list[int], keep: bool) -> None:
        """Start with one request computed and cached (and maybe finished), so later ones can hit.

        Few blocks make exhaustion and eviction common; some prompts never fit at all.
        """
        self.bm = BlockManager(num_blocks=num_blocks, block_size=BS, window=self.WINDOW)
        self.add_request(prefix, tail, None)
        rid, r = "r0", self.live["r0"]
        if not self._prefill(rid, r, len(r.tokens)):
            return
        self._run(rid, r, do_cache=True)
        if not keep:
            self.bm.free(rid)
            del self.live[rid]

    @rule(prefix=PREFIXES, tail=st.lists(ALPHABET, min_size=1, max_size=10),
          extra=st.sampled_from([None, None, None, "salt"]))
    def add_request(self, prefix: tuple[int, ...], tail: list[int], extra: str | None) -> None:
        self._add(list(prefix) + tail, extra)

    @rule(pick=PICK, cut=st.integers(1, 30), extra=st.sampled_from([None, None, None, "salt"]))
    def add_repeat(self, pick: int, cut: int, extra: str | None) -> None:
        """A prompt seen before, whole or cut short: exact repeats, block-aligned full hits, duplicates."""
        self._add(self.seen[pick % len(self.seen)][:cut], extra)

    def _add(self, tokens: list[int], extra: str | None) -> None:
        self.live[f"r{self.next_id}"] = Req(tokens, extra)
        self.seen.append(list(tokens))
        self.next_id += 1

    @precondition(lambda self: self.live)
    @rule(pick=PICK, chunk=st.integers(1, 24))
    def allocate_prefill(self, pick: int, chunk: int) -> None:
        rid, r = self._pick(pick)
        self._prefill(rid, r, chunk)

    @precondition(lambda self: self.live)
    @rule(pick=PICK, do_cache=st.booleans())
    def run_model(self, pick: int, do_cache: bool) -> None:
        rid, r = self._pick(pick)
        self._run(rid, r, do_cache)

    @precondition(lambda self: self.live)
    @rule(pick=PICK, token=ALPHABET)
    def decode_step(self, pick: int, token: int) -> None:
        rid, r = self._pick(pick)
        self._decode(rid, r, token)

    @precondition(lambda self: self.live)
    @rule(pick=PICK, chunk=st.integers(1, 24), token=ALPHABET)
    def engine_step(self, pick: int, chunk: int, token: int) -> None:
        """The common path in one go: schedule (prefill chunk or decode), run, cache."""
        rid, r = self._pick(pick)
        if r.covered < len(r.tokens) and not self._prefill(rid, r, chunk):
            return
        if r.covered == len(r.tokens) == r.computed and not self._decode(rid, r, token):
            return
        self._run(rid, r, do_cache=True)

    @precondition(lambda self: self.live)
    @rule(pick=PICK)
    def free(self, pick: int) -> None:
        """Finish or abort, at any point of the request's life."""
        rid, _ = self._pick(pick)
        self.bm.free(rid)
        del self.live[rid]
        assert not self.bm.has_request(rid)

    @rule()
    def free_unknown(self) -> None:
        before = snapshot(self.bm)
        self.bm.free("never-added")
        assert snapshot(self.bm) == before

    @rule(dice=st.integers(0, 9))
    def reset_prefix_cache(self, dice: int) -> None:
        if dice:  # rare: a reset wipes every hit the other rules built up
            return
        self.bm.reset_prefix_cache()
        assert self.bm._index == {}

    @rule(dice=st.integers(0, 4))
    def end_all(self, dice: int) -> None:
        if dice:  # rare, or requests would seldom live long enough to share blocks
            return
        for rid in list(self.live):
            self.bm.free(rid)
        self.live.clear()
        self._check_all_free()

    # ---- what the rules do

    def _prefill(self, rid: str, r: Req, chunk: int) -> bool:
        """Allocate the next prefill chunk, sized like a scheduler would (never past the prompt)."""
        if r.covered >= len(r.tokens):
            return False
        base = r.covered if r.started else self.bm.get_prefix_hits(r.tokens, r.extra)
        num_new = min(chunk, len(r.tokens) - base)
        before = snapshot(self.bm)
        result = self.bm.allocate(rid, r.tokens, num_new, r.extra)
        if result is None:
            event("allocate failed: all-or-nothing checked")
            assert snapshot(self.bm) == before
            # ... and it failed only for want of blocks (hit blocks leaving the free queue count too).
            held = self.bm.block_table(rid) if r.started else self._hit_blocks(r)
            revived = sum(1 for b in held if b != self.bm.null_block and self.bm._blocks[b].ref_count == 0)
            assert self.bm.blocks_needed(base + num_new) - len(held) + revived > self.bm.num_free_blocks
            return False
        if not r.started:
            assert result == base <= ((len(r.tokens) - 1) // BS) * BS
            if result and result == ((len(r.tokens) - 1) // BS) * BS and len(r.tokens) % BS == 0:
                event("hit capped below a block-aligned prompt")
            assert self.bm.num_cached_tokens(rid) == result
            table = self.bm.block_table(rid)
            first = self.bm.first_needed_block(result)
            for i in range(result // BS):
                if i < first:   # a window hit needs only the blocks the next query sees
                    assert table[i] == self.bm.null_block
                    continue
                # The heart of prefix caching: a hit must hold KV of exactly this prefix.
                assert self.kv[table[i]] == (r.extra, tuple(r.tokens[: (i + 1) * BS]))
            if result:
                event(f"prefix hit of {result // BS} block(s)")
            r.started = True
            r.computed = result
        else:
            assert result == 0
        r.covered = base + num_new
        assert len(self.bm.block_table(rid)) == self.bm.blocks_needed(r.covered)
        return True

    def _hit_blocks(self, r: Req) -> list[int]:
        return self.bm._match_prefix(r.tokens, r.extra)[0]

    def _run(self, rid: str, r: Req, do_cache: bool) -> None:
        """The runner writes KV for the scheduled tokens; then the engine caches the full blocks."""
        if not r.started:
            return
        table = self.bm.block_table(rid)
        end = min(r.covered, len(r.tokens))
        for pos in range(r.computed, end):
            block_id = table[pos // BS]
            assert block_id != self.bm.null_block, "a new token's KV would go to the null block"
            # Copy-on-write safety: never write into a block another table shares.
            assert self.bm._blocks[block_id].ref_count == 1
            block_end = (pos // BS + 1) * BS
            if pos == block_end - 1:
                self.kv[block_id] = (r.extra, tuple(r.tokens[:block_end]))
            else:
                self.kv.pop(block_id, None)  # partly rewritten: holds no full prefix now
        r.computed = end
        if do_cache:
            hashed, indexed = len(self.bm._requests[rid].block_hashes), len(self.bm._index)
            self.bm.cache_full_blocks(rid, r.tokens, end)
            self._check_window(rid, end)
            if len(self.bm._index) - indexed < len(self.bm._requests[rid].block_hashes) - hashed:
                event("duplicate block left out of the index")

    def _decode(self, rid: str, r: Req, token: int) -> bool:
        """Append the sampled token and allocate its slot (only once the whole sequence is computed)."""
        if not r.started or r.computed < len(r.tokens):
            return False
        before = snapshot(self.bm)
        if self.bm.allocate(rid, r.tokens + [token], 1) is None:
            assert snapshot(self.bm) == before
            return False
        r.tokens.append(token)
        r.covered += 1
        assert len(self.bm.block_table(rid)) == self.bm.blocks_needed(r.covered)
        return True

    def _check_window(self, rid: str, computed: int) -> None:
        """Once a step is cached, exactly the blocks before the next query's window are dropped."""
        table = self.bm.block_table(rid)
        first = self.bm.first_needed_block(computed)
        assert all(b == self.bm.null_block for b in table[:first])
        assert self.bm.null_block not in table[first:]
        if self.WINDOW is not None and first:
            event("blocks dropped out of the window")

    def _check_all_free(self) -> None:
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.usage == 0.0
        assert all(b.ref_count == 0 for b in self.bm._blocks)
        assert self.bm._requests == {}

    # ---- invariants, checked after every step

    @invariant()
    def books_balance(self) -> None:
        bm = self.bm
        free = set(bm._free)
        assert len(free) == len(bm._free)
        holders: dict[int, int] = {}
        for req in bm._requests.values():
            held = [b for b in req.block_ids if b != bm.null_block]
            assert len(set(held)) == len(held), "a block twice in one table"
            assert req.block_ids[:req.num_dropped] == [bm.null_block] * req.num_dropped
            for b in held:
                holders[b] = holders.get(b, 0) + 1
        assert not free & holders.keys(), "a block both free and held"
        for block in bm._blocks:
            assert block.ref_count == holders.get(block.block_id, 0)
            assert (block.ref_count == 0) == (block.block_id in free)
        assert bm.num_free_blocks + len(holders) == bm.num_blocks
        assert bm.usage == pytest.approx(len(holders) / bm.num_blocks)
        assert bm._requests.keys() <= self.live.keys(), "blocks held for a request that ended"

    @invariant()
    def index_consistent(self) -> None:
        bm = self.bm
        for block_hash, block_id in bm._index.items():
            block = bm._blocks[block_id]
            assert block.block_hash == block_hash
            assert block.token_ids is not None and len(block.token_ids) == BS
            key = (block.parent_hash, block.token_ids, block.extra_key)
            assert bm_module.hash_block_tokens(*key) == block_hash
            # The indexed block really holds KV of the prefix its hash chain names.
            extra, prefix = self.kv[block_id]
            assert chain_hash(extra, prefix) == block_hash
        for block in bm._blocks:
            # A hashed block is the indexed one; duplicates and evicted blocks carry no key at all.
            if block.block_hash is not None:
                assert bm._index.get(block.block_hash) == block.block_id
            else:
                assert block.token_ids is None

    def teardown(self) -> None:
        if self.bm.stats.evictions:
            event("evicted a cached block")
        for rid in list(self.live):
            self.bm.free(rid)
        self.live.clear()
        self._check_all_free()


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


class WindowBlockManagerMachine(BlockManagerMachine):
    """The same books with a 6-token sliding window (not a multiple of the block): blocks leave the tables as
    requests grow, and prefix hits keep only the blocks the next query sees."""

    WINDOW = 6


TestWindowBlockManagerMachine = WindowBlockManagerMachine.TestCase
TestWindowBlockManagerMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
