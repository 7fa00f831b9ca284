"""Which dtype a matmul runs in on this machine.

The model keeps its weights, activations and KV cache in the compute dtype (bf16 by default: half the bytes of
float32). Whether bf16 *math* is fast is a property of the machine: GPUs, and CPUs with AVX512-BF16 or AMX,
run bf16 GEMMs at or above float32 speed; a CPU without them (an AVX2-only AMD EPYC Zen 3, say) emulates them
7x slower than float32 (20 vs 155 GFLOP/s for a 256x896x4864 GEMM on 2 Zen 3 cores), and a bf16 decode
attention matmul 12x slower. There, a matmul over more than a few rows upcasts its operands, runs in float32
and casts back; a matrix-vector product stays in bf16, where it is bandwidth-bound and half the bytes win.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

# Rows from which an upcast float32 GEMM beats a bf16 one on a CPU without bf16 math (measured on Zen 3:
# a 4864x896 weight, bf16 / upcast+fp32 ms: 4 rows 1.8 / 3.9, 8 rows 3.8 / 4.1, 16 rows 6.9 / 3.9).
UPCAST_MIN_ROWS = 8


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # another torch: read the flags ourselves
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags


def matmul_dtype(dtype: torch.dtype, device: torch.device, rows: int) -> torch.dtype:
    """The dtype to multiply `rows` rows of `dtype` activations in."""
    if dtype == torch.bfloat16 and device.type == "cpu" and rows >= UPCAST_MIN_ROWS and not cpu_has_fast_bf16():
        return torch.float32
    return dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, min_rows: int = 1
           ) -> torch.Tensor:
    """F.linear in the dtype `matmul_dtype` picks; the result comes back in x's dtype. Fewer than `min_rows`
    rows are padded with zero rows (and dropped after): deterministic mode keeps a one-row call off the
    matrix-vector kernel some machines reduce in another order (engine/determinism.py)."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if 0 < rows < min_rows:
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, flat.new_zeros(min_rows - rows, flat.shape[-1])])
        return linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])
    dt = matmul_dtype(x.dtype, x.device, rows)
    if dt == x.dtype:
        return F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))
    return F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt)).to(x.dtype)
