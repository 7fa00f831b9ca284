"""Quantized KV storage formats: int8 and fp8 (e4m3 / e5m2) with one scale per token and KV head.

Each cached row (one token's K or V for one KV head, head_dim values) is stored as `round(x / s)` in the
storage dtype with s = absmax(row) / qmax (symmetric), and s is kept beside the blocks as float16. A scale per
row, not per block or per layer, so appending a token never re-quantizes its block's older tokens, and nothing
depends on which request wrote first: a prefix-cache hit, a preempted request's recompute and a trimmed
speculative draft see exactly the KV a cold run writes. float16 scales cost 2 bytes per 64-value row (KV bytes
per token 0.52x bf16 at head_dim 64, where float32 scales would be 0.53x), and their rounding (2^-11) is far
below the int8 step (1/127 of the row's absmax).

The torch functions here are the reference the native write (`kv_write_`) and decode attention reproduce.
"""
from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
MIN_SCALE = 2.0 ** -24     # float16's smallest subnormal: an all-zero row still gets a positive scale


def is_quantized(dtype: torch.dtype) -> bool:
    """True for the storage dtypes that carry scales."""
    return dtype in QMAX


def scale_bytes(dtype: torch.dtype) -> int:
    """Bytes of the scale each (token, KV head) row carries in this storage dtype (0 for float formats)."""
    return torch.empty((), dtype=SCALE_DTYPE).element_size() if is_quantized(dtype) else 0


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) -> (codes [..., D] in `dtype`, scales [...] float16), per row over D."""
    qmax = QMAX[dtype]
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / qmax).clamp_min(MIN_SCALE).to(SCALE_DTYPE)
    y = (xf / scale.float()[..., None]).clamp(-qmax, qmax)   # clamp: a rounding past qmax would be NaN in fp8
    codes = y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse: codes [..., D], scales [...] -> [..., D] in `dtype` (computed in float32)."""
    return (codes.float() * scale.float()[..., None]).to(dtype)
