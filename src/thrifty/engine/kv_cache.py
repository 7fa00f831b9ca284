"""The KV storage: one preallocated tensor pair per layer, addressed by slot (block_id * block_size + offset)
or by whole blocks.

Sized from a memory budget. The storage dtype is a property of the cache, not of the model: reads come
back in the compute dtype, so quantized KV formats slot in here without touching attention or models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.errors import InvalidRequestError
from thrifty.models.config import ModelConfig
from thrifty.ops.kv_cache import LayerKVCache

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
