"""The KV storage: one preallocated tensor pair per layer, addressed by slot (block_id * block_size + offset)
or by whole blocks.

Sized from a memory budget. The storage dtype is a property of the cache, not of the model: reads come
back in the compute dtype, so quantized KV formats slot in here without touching attention or models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty import native
from thrifty.errors import InvalidRequestError
from thrifty.models.config import ModelConfig

GIB = 1024 ** 3


@dataclass(slots=True, frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        return block_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size, self.dtype)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @classmethod
    def from_budget(cls, config: ModelConfig, memory_gib: float, block_size: int, dtype: torch.dtype,
                    num_blocks: int | None = None) -> KVCacheSpec:
        per_block = block_bytes(config.num_layers, config.num_kv_heads, config.head_dim, block_size, dtype)
        num_blocks = num_blocks if num_blocks is not None else int(memory_gib * GIB) // per_block
        if num_blocks < 1:
            raise InvalidRequestError(
                f"kv_cache_memory={memory_gib} GiB holds no {block_size}-token block ({per_block} bytes each)",
                "raise kv_cache_memory", param="kv_cache_memory")
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, block_size, num_blocks, dtype)


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


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


class PagedKVCache:
    """All layers' KV storage, allocated once."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        shape = (spec.num_layers, spec.num_kv_heads, spec.num_blocks, spec.block_size, spec.head_dim)
        self._k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self._v = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.layers = [LayerKVCache(self._k[i], self._v[i]) for i in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return self._k.nbytes + self._v.nbytes
