"""One layer's paged K and V storage: the tensors the attention op writes new tokens into and reads contexts from.

Allocated by the engine's PagedKVCache (engine/kv_cache.py), which sizes it from a memory budget; addressed by
slot (block_id * block_size + offset) or by whole blocks. Quantized formats (ops/kv_quant.py) keep a bfloat16
scale per (KV head, slot) beside the blocks; reads come back dequantized in the compute dtype.
"""
from __future__ import annotations

import torch

from thrifty import native
from thrifty.ops import kv_quant


class LayerKVCache:
    """One layer's K and V, heads outermost: [num_kv_heads, num_blocks, block_size, head_dim], and for quantized
    formats their scales [num_kv_heads, num_blocks, block_size] and K's fixed per-channel shift and divisor
    `k_shift`, `k_channel` [num_kv_heads, head_dim] (float32; ops/kv_quant.py).

    Heads outermost makes a gather of whole blocks one contiguous copy per head that lands directly in
    the [Hkv, B, L, D] layout the decode matmuls read (no permute copies), and a prefill's context read is
    already in the [Hkv, L, D] layout SDPA wants."""

    __slots__ = ("k", "v", "k_scale", "v_scale", "k_shift", "k_channel", "_k_slots", "_v_slots")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None, k_shift: torch.Tensor | None = None,
                 k_channel: torch.Tensor | None = None) -> None:
        self.k, self.v, self.k_scale, self.v_scale = k, v, k_scale, v_scale
        self.k_shift, self.k_channel = k_shift, k_channel
        hkv, blocks, block_size, d = k.shape
        self._k_slots = k.view(hkv, blocks * block_size, d)
        self._v_slots = v.view(hkv, blocks * block_size, d)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def native_reads(self) -> bool:
        """True when the native decode attention and KV write take this cache."""
        return native.runs_kv(self.k)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [T, Hkv, D] for the T slots."""
        if native.runs(k) and self.native_reads() and k.shape[-1] % 8 == 0:
            native.kv_write_(self.k, self.v, k, v, slots, self.k_scale, self.v_scale, self.k_channel, self.k_shift)
            return
        for new, store, scales, channel, shift in (
                (k, self._k_slots, self.k_scale, self._channel(self.k_channel, 1), self._channel(self.k_shift, 1)),
                (v, self._v_slots, self.v_scale, None, None)):
            rows = new.transpose(0, 1)                                     # [Hkv, T, D]
            if scales is None:
                store.index_copy_(1, slots, rows.to(store.dtype))
                continue
            codes, scale = kv_quant.quantize(rows, store.dtype, channel, shift)
            _raw(store).index_copy_(1, slots, _raw(codes))
            _by_slot(scales).index_copy_(1, slots, scale)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` ([L]) as [Hkv, L, D], in the compute dtype."""
        return (self._gather(self._k_slots, _by_slot(self.k_scale), slots, dtype, self._channel(self.k_channel, 1)),
                self._gather(self._v_slots, _by_slot(self.v_scale), slots, dtype, None))

    def read_blocks(self, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks: block_ids [B, nb] -> [Hkv, B, nb * block_size, D], in the compute dtype."""
        b, nb = block_ids.shape
        hkv, _, block_size, d = self.k.shape
        flat = block_ids.reshape(-1)
        k = self._gather(self.k, self.k_scale, flat, dtype, self._channel(self.k_channel, 2)).view(hkv, b, nb * block_size, d)
        v = self._gather(self.v, self.v_scale, flat, dtype, None).view(hkv, b, nb * block_size, d)
        return k, v

    @staticmethod
    def _channel(vector: torch.Tensor | None, middle_dims: int) -> torch.Tensor | None:
        """A per-channel vector [Hkv, D] shaped to broadcast over [Hkv, (middle_dims dims), D]."""
        if vector is None:
            return None
        return vector.view(vector.shape[0], *([1] * middle_dims), vector.shape[1])

    @staticmethod
    def _gather(store: torch.Tensor, scales: torch.Tensor | None, index: torch.Tensor, dtype: torch.dtype,
                channel: torch.Tensor | None) -> torch.Tensor:
        """Entries `index` of dim 1 (slots or blocks, as `store` and `scales` are viewed), dequantized."""
        codes = _raw(store).index_select(1, index).view(store.dtype)
        if scales is None:
            return codes.to(dtype)
        return kv_quant.dequantize(codes, scales.index_select(1, index), dtype, channel)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes: torch's CPU index_copy_ / index_select take no float8 dtypes."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _by_slot(scales: torch.Tensor | None) -> torch.Tensor | None:
    """Scales [Hkv, blocks, block_size] as [Hkv, slots]."""
    return None if scales is None else scales.view(scales.shape[0], -1)
