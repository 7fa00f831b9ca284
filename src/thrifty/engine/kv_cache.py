"""The KV storage: one preallocated tensor pair per layer, addressed by slot (block_id * block_size + offset)
or by whole blocks.

Sized from a memory budget. The storage dtype is a property of the cache, not of the model: reads come
back in the compute dtype. int8 / fp8 storage (ops/kv_quant.py) adds a bfloat16 scale per token and KV head,
allocated beside the blocks and counted in every byte figure here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.errors import InvalidRequestError
from thrifty.models.config import ModelConfig
from thrifty.ops import kv_quant
from thrifty.ops.kv_cache import LayerKVCache

GIB = 1024 ** 3
# kv_cache_dtype names (EngineConfig, YAML, CLI) -> storage dtype; "auto" is the model's dtype
KV_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "int8": torch.int8,
                   "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def check_kv_cache_dtype(name: str) -> None:
    if name != "auto" and name not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"unknown kv_cache_dtype {name!r}",
                                  f"use auto or one of {', '.join(KV_CACHE_DTYPES)}", param="kv_cache_dtype")


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype a kv_cache_dtype name stands for."""
    check_kv_cache_dtype(name)
    return model_dtype if name == "auto" else KV_CACHE_DTYPES[name]


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
    """Bytes of K and V for one block across all layers, their scales included."""
    row = head_dim * torch.empty((), dtype=dtype).element_size() + kv_quant.scale_bytes(dtype)
    return 2 * num_layers * block_size * num_kv_heads * row


class PagedKVCache:
    """All layers' KV storage, allocated once."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu",
                 k_transform: tuple[torch.Tensor, torch.Tensor] | None = None, scratch_block: bool = False) -> None:
        """k_transform: (shift, divisor), each [num_layers, num_kv_heads, head_dim], of an int8 / fp8 cache's K
        (engine/kv_calibration.py); ignored by float caches. scratch_block: one block more than the spec's, at
        index spec.num_blocks, that no sequence owns: the padding rows of a CUDA-graph decode step write there
        (engine/cuda_graphs.py)."""
        self.spec = spec
        self.scratch_block = spec.num_blocks if scratch_block else None
        shape = (spec.num_layers, spec.num_kv_heads, spec.num_blocks + int(scratch_block), spec.block_size,
                 spec.head_dim)
        self._k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self._v = torch.zeros(shape, dtype=spec.dtype, device=device)
        self._scales: tuple[torch.Tensor, torch.Tensor] | None = None
        if kv_quant.is_quantized(spec.dtype):
            self._scales = tuple(torch.ones(shape[:-1], dtype=kv_quant.SCALE_DTYPE, device=device) for _ in "kv")
        shift = divisor = None
        if self._scales is not None and k_transform is not None:
            shift, divisor = (t.to(device=device, dtype=torch.float32) for t in k_transform)
        self.layers = [LayerKVCache(self._k[i], self._v[i], *self._layer_scales(i),
                                    *((shift[i].contiguous(), divisor[i].contiguous()) if shift is not None
                                      else (None, None)))
                       for i in range(spec.num_layers)]

    def _layer_scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self._scales is None else (self._scales[0][layer], self._scales[1][layer])

    @property
    def nbytes(self) -> int:
        scales = sum(s.nbytes for s in self._scales) if self._scales is not None else 0
        return self._k.nbytes + self._v.nbytes + scales
