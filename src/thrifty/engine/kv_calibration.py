"""K's per-channel shift and divisor for int8 / fp8 KV caches (ops/kv_quant.py), measured once per model on
fixed text.

A short fixed passage (code and prose) runs through the model with a float32 cache; each layer's K, per KV head
and channel, gives its mean over the passage (the shift) and the root-mean-square of what is left (the divisor).
The two channels RoPE rotates into each other share the larger divisor (the pair (c, c + D/2) of the neox
layout: at long contexts their energy moves between them); divisors are normalized to mean 1 per head. Fixed text, so the vector is a property of the model: every engine, request and
prefix-cache hit quantizes with the same one.
"""
from __future__ import annotations

import torch

from thrifty.engine.kv_cache import KVCacheSpec, PagedKVCache
from thrifty.ops.attention_metadata import AttentionMetadata
from thrifty.ops.forward_context import set_forward_context

TEXT = '''def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

The river runs past the old mill, where the town keeps its records of every flood since 1850. Visitors can read
them in the library on weekdays; the archive answers questions by mail.
'''
BLOCK = 16


@torch.inference_mode()
def k_transform(model: torch.nn.Module, num_layers: int, num_kv_heads: int, head_dim: int, ids: list[int],
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, divisor), each [num_layers, num_kv_heads, head_dim] float32."""
    n = len(ids)
    blocks = -(-n // BLOCK)
    cache = PagedKVCache(KVCacheSpec(num_layers, num_kv_heads, head_dim, BLOCK, blocks, torch.float32), device)
    meta = AttentionMetadata.build([list(range(blocks))], [n], [n], BLOCK, cache.layers, device)
    with set_forward_context(meta):
        model(torch.tensor(ids, device=device), torch.arange(n, device=device))
    k = torch.stack([layer.k.reshape(num_kv_heads, -1, head_dim)[:, :n] for layer in cache.layers])  # [L, Hkv, n, D]
    shift = k.mean(dim=2)
    rms = (k - shift[:, :, None]).pow(2).mean(dim=2).sqrt()
    paired = torch.maximum(rms, rms.roll(head_dim // 2, dims=-1))
    paired = paired.clamp_min(paired.mean(dim=-1, keepdim=True) * 1e-3)       # no zero divisor
    return shift.contiguous(), (paired / paired.mean(dim=-1, keepdim=True)).contiguous()


def calibrate(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """k_transform of a loaded model on the fixed text."""
    c = loaded.config
    ids = loaded.tokenizer.encode(TEXT)
    return k_transform(loaded.model, c.num_layers, c.num_kv_heads, c.head_dim, ids, loaded.device)
