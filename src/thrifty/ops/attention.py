"""Paged attention: the op every attention layer calls, its torch implementation, and the slow reference.

A step's flat batch holds decode tokens first (one query each), then prefill chunks. Decodes run the native
kernel over the block tables where it runs, else one batched matmul over their contexts, gathered as whole
blocks and padded to the longest (on CPUs a manual matmul + float32 softmax beats SDPA for decode; in float32
where bf16 math is emulated, see thrifty.ops.precision); each prefill chunk runs SDPA over its cached prefix
plus itself, except a short chunk after a cached prefix (the rest of a long prompt prefilled a little at a
time beside decodes, or speculative tokens to verify): its queries are decodes of growing context lengths over
one block table, which the native kernel reads in place, where SDPA would gather the whole context first.

With an int8 / fp8 KV cache every read is of the quantized KV, a prompt's first chunk included (it reads its
own K/V back from the cache, not the exact values it wrote): a token's attention then sees the same K/V
whether it ran in a prefill, a later chunk, a decode or after a prefix-cache hit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from thrifty import native
from thrifty.ops import forward_context
from thrifty.ops.attention_metadata import NEG_INF, AttentionMetadata, PrefillSpan
from thrifty.ops.kv_cache import LayerKVCache
from thrifty.ops.precision import matmul_dtype


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
                    window: int | None = None) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] for the step's new tokens. Writes k, v to layer's cache; returns [T, H, D].

    The step's metadata comes from the forward context the runner set."""
    meta = forward_context.current(layer)
    cache = meta.kv_caches[layer]
    cache.write(k, v, meta.slot_mapping)
    if not meta.prefills:                       # a pure decode step: no output buffer to assemble
        return _decode(q, cache, meta, scale, window)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[:meta.num_decodes] = _decode(q[:meta.num_decodes], cache, meta, scale, window)
    for i, span in enumerate(meta.prefills):
        qs = q[span.start:span.end]
        if _native_decodes(qs, cache) and (meta.rows_as_decodes or _as_decodes(qs, span)):
            out[span.start:span.end] = _chunk_as_decodes(qs, cache, span, scale, window)
            continue
        if span.slots is not None:
            ks, vs = cache.read(span.slots, q.dtype)
        elif cache.quantized or meta.rows_as_decodes:     # as decodes would: attend over what the cache stores
            ks, vs = cache.read(meta.slot_mapping[span.start:span.end], q.dtype)
        else:
            ks, vs = k[span.start:span.end].transpose(0, 1), v[span.start:span.end].transpose(0, 1)
        out[span.start:span.end] = _prefill(qs, ks, vs, meta.prefill_mask(i, window), scale)
    return out


CHUNK_AS_DECODES = 32   # chunks up to this many tokens after a cached prefix run as decodes


def _native_decodes(q: torch.Tensor, cache: LayerKVCache) -> bool:
    """The native decode kernel takes these queries over this cache (float16 caches, for one, it does not)."""
    return native.runs(q) and cache.native_reads() and q.shape[-1] % 8 == 0


def _as_decodes(q: torch.Tensor, span: PrefillSpan) -> bool:
    return span.blocks is not None and q.shape[0] <= CHUNK_AS_DECODES


def _chunk_as_decodes(q: torch.Tensor, cache: LayerKVCache, span: PrefillSpan, scale: float,
                      window: int | None) -> torch.Tensor:
    """Query i of the chunk attends to the context up to and including itself: a decode of that length."""
    n = q.shape[0]
    lens = torch.arange(span.context_len - n + 1, span.context_len + 1, dtype=torch.long, device=q.device)
    tables = span.blocks[None].expand(n, -1).contiguous()
    return native.decode_attention(q, cache.k, cache.v, tables, lens, scale, window, cache.k_scale, cache.v_scale,
                                   cache.k_channel)


def _decode(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
            window: int | None) -> torch.Tensor:
    b, h, d = q.shape
    if _native_decodes(q, cache):                                  # one fused kernel over the blocks
        return native.decode_attention(q, cache.k, cache.v, meta.decode_blocks, meta.decode_context_lens, scale,
                                       window, cache.k_scale, cache.v_scale,
                                   cache.k_channel)
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
