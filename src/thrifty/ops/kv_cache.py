"""One layer's paged K and V storage: the tensors the attention op writes new tokens into and reads contexts from.

Allocated by the engine's PagedKVCache (engine/kv_cache.py), which sizes it from a memory budget; addressed by
slot (block_id * block_size + offset) or by whole blocks.
"""
from __future__ import annotations

import torch

from thrifty import native


class LayerKVCache:
    """One layer's K and V, heads outermost: [num_kv_heads, num_blocks, block_size, head_dim].

    Heads outermost makes a gather of whole blocks one contiguous copy per head that lands directly in
    the [Hkv, B, L, D] layout the decode matmuls read (no permute copies), and a prefill's context read is
    already in the [Hkv, L, D] layout SDPA wants."""

    __slots__ = ("k", "v", "_k_slots", "_v_slots")

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        hkv, blocks, block_size, d = k.shape
        self._k_slots = k.view(hkv, blocks * block_size, d)
        self._v_slots = v.view(hkv, blocks * block_size, d)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [T, Hkv, D] for the T slots."""
        if native.runs(k) and native.runs(self.k) and k.shape[-1] % 8 == 0:
            native.kv_write_(self.k, self.v, k, v, slots)
            return
        self._k_slots.index_copy_(1, slots, k.transpose(0, 1).to(self.k.dtype))
        self._v_slots.index_copy_(1, slots, v.transpose(0, 1).to(self.v.dtype))

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` ([L]) as [Hkv, L, D], in the compute dtype."""
        return self._k_slots.index_select(1, slots).to(dtype), self._v_slots.index_select(1, slots).to(dtype)

    def read_blocks(self, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks: block_ids [B, nb] -> [Hkv, B, nb * block_size, D], in the compute dtype."""
        b, nb = block_ids.shape
        hkv, _, block_size, d = self.k.shape
        flat = block_ids.reshape(-1)
        k = self.k.index_select(1, flat).view(hkv, b, nb * block_size, d)
        v = self.v.index_select(1, flat).view(hkv, b, nb * block_size, d)
        return k.to(dtype), v.to(dtype)
