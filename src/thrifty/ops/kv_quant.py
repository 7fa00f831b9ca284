"""Quantized KV storage formats: int8 and fp8 (e4m3 / e5m2) with one scale per token and KV head.

Each cached row (one token's K or V for one KV head, head_dim values) is stored as `round(x / s)` in the
storage dtype with s = absmax(row) / qmax (symmetric), and s is kept beside the blocks as bfloat16. A scale per
row, not per block or per layer, so appending a token never re-quantizes its block's older tokens, and nothing
depends on which request wrote first: a prefix-cache hit, a preempted request's recompute and a trimmed
speculative draft see exactly the KV a cold run writes.

2-byte scales: KV bytes per token 0.52x bf16 at head_dim 64 (float32 scales: 0.53x). bfloat16 rather than
float16 for its exponent range: absmax / 57344 (fp8_e5m2) is a float16 subnormal for any row under ~3.5, which
would cost the scale its precision. The scale is rounded *up* to bfloat16, so no code clips; that wastes at most
2^-8 of the code range.

K is first shifted and divided per channel by two fixed vectors (`shift`, `channel`: one per layer and KV head,
engine/kv_calibration.py): Qwen2's keys carry a few channels tens of times larger than the rest (mostly a constant
from the k_proj bias), which would set every row's absmax and leave the other channels a handful of int8 steps.
Subtracting the channel's mean and dividing by its spread evens them out, at no cost to the attention: every key
of a query moves by the same `shift`, which adds one constant to all its scores and leaves the softmax as it was
(so the shift is never added back), and the query is multiplied by `channel` instead of K being multiplied
(q . k = (q * c) . (k / c)). The per-row absmax still bounds every code, so a channel larger than its
calibration says never clips. Reads of a shifted K return K - shift: fit for attention only.

The torch functions here are the reference the native write (`kv_write_`) and decode attention reproduce.
"""
from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
MIN_SCALE = 2.0 ** -100    # an all-zero row still gets a positive scale


def is_quantized(dtype: torch.dtype) -> bool:
    """True for the storage dtypes that carry scales."""
    return dtype in QMAX


def scale_bytes(dtype: torch.dtype) -> int:
    """Bytes of the scale each (token, KV head) row carries in this storage dtype (0 for float formats)."""
    return torch.empty((), dtype=SCALE_DTYPE).element_size() if is_quantized(dtype) else 0


def quantize(x: torch.Tensor, dtype: torch.dtype, channel: torch.Tensor | None = None,
             shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) -> (codes [..., D] in `dtype`, scales [...] bfloat16), per row over D, of
    (x - shift) / channel (float32, broadcast against x) where those are given."""
    qmax = QMAX[dtype]
    xf = x.float() if shift is None else x.float() - shift
    xf = xf if channel is None else xf / channel
    scale = round_up_bf16((xf.abs().amax(dim=-1) / qmax).clamp_min(MIN_SCALE))
    y = (xf / scale.float()[..., None]).clamp(-qmax, qmax)   # clamp: a rounding past qmax would be NaN in fp8
    codes = y.round().to(dtype) if dtype == torch.int8 else y.to(dtype)
    return codes, scale


def round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """Positive finite float32 -> the smallest bfloat16 >= it (bf16 is the top half of a float32)."""
    bits = (x.float().view(torch.int32) + 0xFFFF) & ~0xFFFF
    return bits.view(torch.float32).to(SCALE_DTYPE)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               channel: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse: codes [..., D], scales [...] -> [..., D] in `dtype` (computed in float32)."""
    x = codes.float() * scale.float()[..., None]
    return (x if channel is None else x * channel).to(dtype)
