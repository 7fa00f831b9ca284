"""Paged attention: the metadata one step carries, and the torch implementation of the ops.

A step's flat batch holds decode tokens first (one query each), then prefill chunks. Decodes run as one
batched matmul over their contexts, gathered as whole blocks and padded to the longest (on CPUs a manual
matmul + float32 softmax beats SDPA for decode, see FACTS.md; in float32 where bf16 math is emulated, see
thrifty.models.precision); each prefill chunk runs SDPA over its
cached prefix plus itself.
Index tensors and masks are built once per step and shared by every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from thrifty import native
from thrifty.engine.kv_cache import LayerKVCache
from thrifty.models.precision import matmul_dtype

NEG_INF = float("-inf")


@dataclass(slots=True)
class PrefillSpan:
    start: int                   # token range [start, end) in the flat batch
    end: int
    context_len: int             # tokens in the cache for this sequence once this chunk is written
    slots: torch.Tensor | None   # cache slots of the whole context; None when the chunk is the whole context


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor             # [T] where each new token's K/V goes
    num_decodes: int                       # the first num_decodes tokens are one-token queries
    decode_blocks: torch.Tensor | None     # [B, nb] block ids of each decode's context, padded with block 0
    decode_context_lens: torch.Tensor | None  # [B]
    block_size: int
    prefills: list[PrefillSpan]
    kv_caches: list[LayerKVCache]
    _masks: dict = field(default_factory=dict)  # per sliding-window size, built on first use in a step

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
              block_size: int, kv_caches: list[LayerKVCache], device: torch.device | str = "cpu") -> AttentionMetadata:
        """Sequences in batch order; all one-token queries must come first."""
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
            prefills.append(PrefillSpan(start, start + q, ctx, slots))
            start += q
        return cls(slot_mapping, num_decodes, decode_blocks, decode_lens, block_size, prefills, kv_caches)

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


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, layer: int,
                    scale: float, window: int | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] for the step's new tokens. Writes k, v to the cache; returns [T, H, D]."""
    cache = meta.kv_caches[layer]
    cache.write(k, v, meta.slot_mapping)
    if not meta.prefills:                       # a pure decode step: no output buffer to assemble
        return _decode(q, cache, meta, scale, window)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[:meta.num_decodes] = _decode(q[:meta.num_decodes], cache, meta, scale, window)
    for i, span in enumerate(meta.prefills):
        qs = q[span.start:span.end]
        if span.slots is None:
            ks, vs = k[span.start:span.end].transpose(0, 1), v[span.start:span.end].transpose(0, 1)
        else:
            ks, vs = cache.read(span.slots, q.dtype)
        out[span.start:span.end] = _prefill(qs, ks, vs, meta.prefill_mask(i, window), scale)
    return out


def _decode(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
            window: int | None) -> torch.Tensor:
    b, h, d = q.shape
    if native.runs(q) and native.runs(cache.k) and d % 8 == 0:    # one fused kernel over the blocks
        return native.decode_attention(q, cache.k, cache.v, meta.decode_blocks, meta.decode_context_lens, scale,
                                       window)
    dt = matmul_dtype(q.dtype, q.device, b * h)                     # float32 where bf16 math is emulated
    keys, values = cache.read_blocks(meta.decode_blocks, dt)       # [Hkv, B, L, D], L = whole blocks
    hkv = keys.shape[0]
    qg = q.to(dt).view(b, hkv, h // hkv, d).transpose(0, 1)        # [Hkv, B, G, D]: query heads by KV head
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float()      # [Hkv, B, G, L]
    probs = torch.softmax(scores * scale + meta.decode_mask(window), dim=-1).to(dt)
    return torch.matmul(probs, values).transpose(0, 1).reshape(b, h, d).to(q.dtype)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             scale: float) -> torch.Tensor:
    """q: [n, H, D]; k, v: [Hkv, L, D] (the cache's layout)."""
    # A leading batch dim of 1: on CPU, 3-D inputs take a path several times slower than 4-D ones.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None],
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        window: int | None = None) -> torch.Tensor:
    """The slow, obvious reference: one sequence, contiguous K/V, causal, float32. q: [n, H, D], k/v: [L, Hkv, D]
    with the n queries being the last n positions."""
    n, h, d = q.shape
    length, hkv = k.shape[0], k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    k = k.float().repeat_interleave(h // hkv, dim=1)
    v = v.float().repeat_interleave(h // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(length - n, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, NEG_INF)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
