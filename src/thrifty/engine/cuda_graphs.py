"""CUDA graphs for decode steps: one captured forward (and LM head) per batch bucket, replayed over static buffers.

An eager decode step launches ~1,200 kernels for a 24-layer model and the GPU idles between them (3 % busy on an
H200). A graph replays the same kernels in one launch; the step's own work is copying its token ids, positions,
slots, context lengths and block table into the buffers the graph reads, then one replay.

Buckets, as vLLM: a step of B sequences replays the graph of the smallest batch bucket >= B (1, 2, 4, 8, then
multiples of 16) and of the smallest block-table width bucket (a power of two) that holds its longest context;
decode attention reads whole padded contexts, so the width is part of the shape. Padding rows write their K/V to
a scratch block that the block manager never hands out, and their logits are never read. A graph is captured the
first time a step needs its bucket (a forward's cost, once); a capture that fails turns graphs off with the reason
logged, and every step runs eagerly as before.

Only plain decode steps replay (every sequence one token, no drafts, one KV group): prefill chunks change shape
every step and run eagerly, as in vLLM's default.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from thrifty.engine.kv_cache import PagedKVCache
from thrifty.ops.attention_metadata import AttentionMetadata
from thrifty.ops.forward_context import set_forward_context

log = logging.getLogger(__name__)

Replay = Callable[[], None]
Capture = Callable[[Callable[[], None], object], Replay]   # (step function, memory pool) -> replay

MAX_GRAPH_CONTEXT_TOKENS = 1 << 20      # batch x width x block_size above this: eager (the gather would be huge)
MIN_WIDTH_BLOCKS = 8                    # short contexts share one width bucket: fewer captures


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, ... up to the first bucket >= max_batch."""
    buckets = [1, 2, 4, 8]
    while buckets[-1] < max_batch:
        buckets.append(buckets[-1] + 16 if buckets[-1] >= 16 else 16)
    return [b for b in buckets if b < max_batch] + [next(b for b in buckets if b >= max_batch)]


def cuda_capture(step: Callable[[], None], pool: object) -> Replay:
    """Warm the step up on a side stream (cuBLAS handles, lazy allocations), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        step()
    return graph.replay


def eager_capture(step: Callable[[], None], pool: object) -> Replay:
    """The same bookkeeping without a graph: each replay runs the step. Tests run the graph path on a CPU with it."""
    return step


def capturer(device: torch.device) -> Capture | None:
    """How decode steps are captured on this device; None: they are not (CPUs run the eager path)."""
    return cuda_capture if device.type == "cuda" else None


def new_pool(device: torch.device) -> object:
    return torch.cuda.graph_pool_handle() if device.type == "cuda" else None


@dataclass(slots=True)
class DecodeRow:
    """One sequence of a decode step: its newest token at `position`, its KV group's block table."""
    token_id: int
    position: int
    block_table: list[int]


class DecodeGraphs:
    """Static input buffers, one static logits buffer, and a replay per (batch bucket, width bucket)."""

    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache, max_batch: int, max_model_len: int,
                 device: torch.device, capture: Capture) -> None:
        if kv_cache.scratch_block is None:
            raise ValueError("decode graphs need a KV cache with a scratch block for padding rows")
        self.model, self.kv_cache, self.device, self._capture_fn = model, kv_cache, device, capture
        self.block_size = kv_cache.spec.block_size
        self.batches = batch_buckets(max_batch)
        self.max_blocks = -(-max_model_len // self.block_size)
        n = self.batches[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.context_lens = torch.ones(n, dtype=torch.long, device=device)
        self.tables: dict[int, torch.Tensor] = {}          # width bucket -> [n, width] block ids
        self.logits: torch.Tensor | None = None            # [n, vocab], allocated outside the graphs' pool
        self._replays: dict[tuple[int, int], Replay] = {}
        self._pool = new_pool(device)
        self.disabled: str | None = None                   # why graphs were turned off, if they were
        self.capture_s = 0.0                               # seconds spent capturing (a one-time cost per bucket)

    @property
    def captures(self) -> int:
        return len(self._replays)

    @property
    def state(self) -> str:
        """For reports: how many graphs were captured, or why graphs are off."""
        return f"off: {self.disabled}" if self.disabled else f"{self.captures} graphs captured"

    def bucket(self, batch: int, blocks: int) -> tuple[int, int] | None:
        """The (batch, width) graph a step of `batch` rows over at most `blocks` blocks each replays, or None."""
        if self.disabled is not None or batch > self.batches[-1] or blocks > self.max_blocks:
            return None
        b = next(x for x in self.batches if x >= batch)
        width = min(max(1 << max(blocks - 1, 0).bit_length(), MIN_WIDTH_BLOCKS), self.max_blocks)
        if b * width * self.block_size > MAX_GRAPH_CONTEXT_TOKENS:
            return None
        return b, width

    def run(self, rows: list[DecodeRow]) -> torch.Tensor | None:
        """Logits [len(rows), vocab] of one decode step over `rows`, or None where no graph takes the step
        (the caller then runs it eagerly). The rows' K/V are written to their slots as in an eager step."""
        blocks = max(-(-(r.position + 1) // self.block_size) for r in rows)
        key = self.bucket(len(rows), blocks)
        if key is None:
            return None
        replay = self._replays.get(key) or self._capture(*key)
        if replay is None:
            return None
        self._fill(rows, *key)
        replay()
        return self.logits[:len(rows)]

    def _fill(self, rows: list[DecodeRow], batch: int, width: int) -> None:
        """Copy the step's inputs into the static buffers; padding rows read and write the scratch block."""
        bs, scratch, pad = self.block_size, self.kv_cache.scratch_block, batch - len(rows)
        table = torch.full((batch, width), scratch, dtype=torch.long)
        for i, r in enumerate(rows):
            used = r.block_table[:-(-(r.position + 1) // bs)]
            table[i, :len(used)] = torch.tensor(used, dtype=torch.long)
        ids = [r.token_id for r in rows] + [0] * pad
        positions = [r.position for r in rows] + [0] * pad
        slots = [r.block_table[r.position // bs] * bs + r.position % bs for r in rows] + [scratch * bs] * pad
        host = torch.tensor([ids, positions, slots, [p + 1 for p in positions]], dtype=torch.long)
        for buffer, values in zip((self.ids, self.positions, self.slots, self.context_lens), host):
            buffer[:batch].copy_(values, non_blocking=True)
        self.tables[width][:batch].copy_(table, non_blocking=True)

    def _forward(self, batch: int, width: int) -> torch.Tensor:
        """The step the graph holds: forward over the first `batch` rows of the buffers, then their logits."""
        meta = AttentionMetadata(self.slots[:batch], batch, self.tables[width][:batch], self.context_lens[:batch],
                                 self.block_size, [], self.kv_cache.layers)
        with set_forward_context(meta):
            hidden = self.model(self.ids[:batch], self.positions[:batch])
        return self.model.compute_logits(hidden)

    def _capture(self, batch: int, width: int) -> Replay | None:
        if width not in self.tables:
            self.tables[width] = torch.full((self.batches[-1], width), self.kv_cache.scratch_block,
                                            dtype=torch.long, device=self.device)
        start = time.perf_counter()
        self.slots.fill_(self.kv_cache.scratch_block * self.block_size)   # capture writes only the scratch block
        self.context_lens.fill_(1)
        self.tables[width].fill_(self.kv_cache.scratch_block)
        try:
            if self.logits is None:                      # its shape and dtype from one eager forward
                probe = self._forward(1, width)
                self.logits = torch.empty((self.batches[-1], probe.shape[-1]), dtype=probe.dtype,
                                          device=self.device)
            out = self.logits[:batch]
            replay = self._capture_fn(lambda: out.copy_(self._forward(batch, width)), self._pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly, say why once
            self.disabled = f"{type(exc).__name__}: {exc}"
            log.warning("decode graphs off: capturing batch %d, width %d failed (%s)", batch, width, self.disabled)
            return None
        self._replays[(batch, width)] = replay
        self.capture_s += time.perf_counter() - start
        return replay
