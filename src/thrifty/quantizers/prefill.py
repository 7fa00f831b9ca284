"""Attention metadata (and a fresh paged KV cache) for running whole sequences through a model outside the
engine: the quantizers' calibration passes and the perplexity evaluation."""
from __future__ import annotations

import torch

from thrifty.engine.kv_cache import KVCacheSpec, PagedKVCache
from thrifty.ops.attention_metadata import AttentionMetadata

BLOCK = 16


def prefill_meta(config, lengths: list[int], dtype: torch.dtype, device: torch.device | str = "cpu",
                 shared_layers: bool = False,
                 k_transform: tuple[torch.Tensor, torch.Tensor] | None = None,
                 rows_as_decodes: bool = False) -> AttentionMetadata:
    """Metadata (and a fresh KV cache) for whole sequences run as one prefill each. `dtype`: the KV cache's
    storage; `k_transform`: an int8 / fp8 cache's K shift and divisor (engine/kv_calibration.py);
    `rows_as_decodes`: every row attends through the decode kernel, as if decoded one token at a time."""
    blocks = [-(-n // BLOCK) for n in lengths]
    layers = 1 if shared_layers else config.num_layers
    spec = KVCacheSpec(layers, config.num_kv_heads, config.head_dim, BLOCK, sum(blocks), dtype)
    cache = PagedKVCache(spec, device, k_transform)
    caches = cache.layers * config.num_layers if shared_layers else cache.layers
    tables, start = [], 0
    for b in blocks:
        tables.append(list(range(start, start + b)))
        start += b
    return AttentionMetadata.build(tables, lengths, lengths, BLOCK, caches, device, rows_as_decodes)
