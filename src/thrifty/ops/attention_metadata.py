"""What the attention op needs to know about one step: where new K/V go, each decode's blocks, each prefill chunk.

Built once per step by the model runner (engine/runner.py) and shared by every layer through the forward
context (ops/forward_context.py); masks are built on first use in a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thrifty.ops.kv_cache import LayerKVCache

NEG_INF = float("-inf")


@dataclass(slots=True)
class PrefillSpan:
    start: int                   # token range [start, end) in the flat batch
    end: int
    context_len: int             # tokens in the cache for this sequence once this chunk is written
    slots: torch.Tensor | None   # cache slots of the whole context; None when the chunk is the whole context
    blocks: torch.Tensor | None = None  # [nb] block ids of the whole context (with slots)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor             # [T] where each new token's K/V goes
    num_decodes: int                       # the first num_decodes tokens are one-token queries
    decode_blocks: torch.Tensor | None     # [B, nb] block ids of each decode's context, padded with block 0
    decode_context_lens: torch.Tensor | None  # [B]
    block_size: int
    prefills: list[PrefillSpan]
    kv_caches: list[LayerKVCache]
    rows_as_decodes: bool = False          # every prefill row attends as a decode (deterministic mode)
    _masks: dict = field(default_factory=dict)  # per sliding-window size, built on first use in a step

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
              block_size: int, kv_caches: list[LayerKVCache], device: torch.device | str = "cpu",
              rows_as_decodes: bool = False) -> AttentionMetadata:
        """Sequences in batch order; all one-token queries must come first. `rows_as_decodes`: every prefill
        row attends as a decode of its own context (deterministic mode)."""
        slot_rows: list[torch.Tensor] = []
        for table, ctx in zip(block_tables, context_lens):
            blocks = torch.tensor(table, dtype=torch.long)
            slot_rows.append((blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx])
        new_slots = [row[ctx - q:] for row, ctx, q in zip(slot_rows, context_lens, query_lens)]
        slot_mapping = torch.cat(new_slots).to(device) if new_slots else torch.empty(0, dtype=torch.long)

        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        if any(q == 1 for q in query_lens[num_decodes:]):
            raise ValueError("one-token queries must come first in the batch")
        decode_blocks = decode_lens = None
        if num_decodes:
            width = max(len(t) for t in block_tables[:num_decodes])
            decode_blocks = torch.zeros(num_decodes, width, dtype=torch.long)
            for i in range(num_decodes):
                decode_blocks[i, :len(block_tables[i])] = torch.tensor(block_tables[i], dtype=torch.long)
            decode_blocks = decode_blocks.to(device)
            decode_lens = torch.tensor(context_lens[:num_decodes], device=device)

        prefills, start = [], num_decodes
        for i in range(num_decodes, len(query_lens)):
            q, ctx = query_lens[i], context_lens[i]
            slots = None if q == ctx else slot_rows[i].to(device)
            blocks = (torch.tensor(block_tables[i], dtype=torch.long, device=device)
                      if slots is not None or rows_as_decodes else None)
            prefills.append(PrefillSpan(start, start + q, ctx, slots, blocks))
            start += q
        return cls(slot_mapping, num_decodes, decode_blocks, decode_lens, block_size, prefills, kv_caches,
                   rows_as_decodes)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """Additive mask [1, B, 1, L]: padding (and keys outside a sliding window) get -inf."""
        key = ("decode", window)
        if key not in self._masks:
            width = self.decode_blocks.shape[1] * self.block_size
            cols = torch.arange(width, device=self.decode_blocks.device)
            lens = self.decode_context_lens[:, None]
            allowed = cols[None, :] < lens
            if window is not None:
                allowed &= cols[None, :] > lens - 1 - window
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            self._masks[key] = mask.masked_fill_(~allowed, NEG_INF)[None, :, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor | None:
        """Boolean mask [n, L] for a chunk over its context (None: plain causal over the chunk itself)."""
        span = self.prefills[index]
        n = span.end - span.start
        if span.slots is None and (window is None or window >= n):
            return None
        key = ("prefill", index, window)
        if key not in self._masks:
            q_pos = torch.arange(span.context_len - n, span.context_len)[:, None]
            k_pos = torch.arange(span.context_len)[None, :]
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= k_pos > q_pos - window
            self._masks[key] = allowed.to(self.slot_mapping.device)
        return self._masks[key]
