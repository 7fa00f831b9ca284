"""Packed weight formats and the matmul kernels behind `Linear` (models/layers.py).

| format        | storage                                   | few tokens (decode)                      | many tokens (prefill)        |
|---------------|-------------------------------------------|------------------------------------------|------------------------------|
| Int8Weight    | int8 [N, K] + one scale per row           | `aten._weight_int8pack_mm` (CPU)          | int8 -> bf16, MKL matmul     |
| Int4Weight    | int4 tinygemm tiles + (scale, zero)/group | `aten._weight_int4pack_mm_for_cpu` (CPU), | unpack -> bf16, MKL matmul   |
|               |                                           | `aten._weight_int4pack_mm` (CUDA)         | (CPU); the kernel on CUDA    |
| Int8GroupWeight | two int4 planes: v = lo + 16 * hi       | two int4 kernel calls, summed             | unpack both -> bf16          |
| Fp8Weight     | float8 e4m3 [N, K] + one scale per row    | upcast to the compute dtype, matmul       | same                         |

The int kernels are matrix-vector kernels: fast while the step has few tokens, slow for a long prompt (their
cost grows with the token count while a bf16 GEMM is compute-bound), so at `DEQUANT_MIN_TOKENS` tokens or
more a CPU step unpacks the weight to the compute dtype once and runs one GEMM; the unpacking is paid once
per forward and shared by all the step's tokens.

Int8GroupWeight holds 8-bit values with one scale per group of 32..256 (GGUF Q8_0 / Q5_0 blocks) exactly:
v = lo + 16 * hi with lo in 0..15 and hi in -8..7, each an int4 plane with its own scale (d and 16 d), so the
fast int4 kernel runs it losslessly (up to the compute dtype of the scales).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from thrifty.errors import UnsupportedModelError
from thrifty.ops import precision
from thrifty import native
from thrifty.quant.qtensor import INT4_GROUP_SIZES, QTensor

DEQUANT_MIN_TOKENS = 32
# thrifty's qgemv keeps ~70 GMAC/s (AVX2) up to a few dozen tokens, where unpacking the weight for one GEMM costs
# more than it saves (2 Zen 3 cores, 0.5B shapes, M=32: 9728x896 3.9 vs 17 ms, 896x4864 1.6 vs 2.5 ms): a
# decode step of up to 64 sequences stays on it, prefill chunks dequantize. Its AVX512-VNNI loop is twice as fast
# and beats dequantize + GEMM over a 0.5B layer up to ~128 tokens (2 Zen 4 cores, the four int4 matmuls of a layer:
# 64 tokens 6.4 vs 10.1 ms, 96: 9.5 vs 12.9, 128: 13.6 vs 14.6, 192: 19.4 vs 18.6;
# results/2026-12-05-epyc-zen4-2core-qgemv/dequant-rows.txt), so it keeps steps of up to 127 tokens.
NATIVE_DEQUANT_MIN_TOKENS = 128 if native.qgemv_path() != native.QGEMV_PATHS["avx2"] and native.has_vnni() else 64
_ROW_BLOCK = 64  # the CPU int4 packing works on blocks of 64 rows (AVX-512) or 32 (AVX2); pad rows to 64


class QuantWeight(nn.Module):
    """A packed [out_features, in_features] weight: forward(x, bias) = x W^T + bias."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())

    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 W^T through the dequantized weight: one GEMM, in the dtype this machine multiplies fastest."""
        return precision.linear(x2, self.dequantize(precision.matmul_dtype(x2.dtype, x2.device, x2.shape[0])))

    @property
    def label(self) -> str:  # pragma: no cover
        raise NotImplementedError


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y + bias if bias is not None else y


# ---- int8, one scale per output channel ---------------------------------------------------------------
class Int8Weight(QuantWeight):
    def __init__(self, qt: QTensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        # fresh copies: the CPU kernel faults on tensors that are not 64-byte aligned (e.g. safetensors views)
        self.register_buffer("q", _aligned(qt.q.to(device=device, dtype=torch.int8)))
        self.register_buffer("scale", _aligned(qt.scale.reshape(-1).to(device=device, dtype=dtype)))

    @property
    def label(self) -> str:
        return "int8"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = _flat(x)
        if x.is_cuda or x2.shape[0] >= DEQUANT_MIN_TOKENS:
            y = self._dense(x2)
        else:
            scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, scale)
        return _finish(y, x, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)

    def gather_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dequantize(dtype)[ids] without dequantizing the other rows (an embedding lookup in a tied table)."""
        return (self.q[ids].float() * self.scale[ids].float()[:, None]).to(dtype)


# ---- int4, group-wise (tinygemm layout) ---------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cpu_int4_block() -> int | None:
    """Rows per block of this machine's CPU int4 packing (64 with AVX-512, 32 with AVX2), or None when its
    layout is none that `_unpack_cpu_int4` reads.

    Checked once per process on a small matrix; when the layout is unknown (another torch version), prefill
    steps keep using the kernel itself: slower for long prompts, still exact.
    """
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (2 * _ROW_BLOCK, 96), generator=g, dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, ValueError):
        return None
    return next((b for b in (64, 32) if torch.equal(_unpack_cpu_int4(packed, 96, b).int(), q)), None)


def _unpack_cpu_int4(packed: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """The CPU packing as uint8 [N, K] values 0..15: per block of rows, K-major, byte j = rows (j, j + block/2)."""
    n = packed.numel() * 2 // k
    blocks = packed.reshape(n // block, k, block // 2)
    both = torch.cat((blocks & 15, blocks >> 4), dim=-1)            # [n/block, K, block]
    return both.transpose(1, 2).reshape(n, k)


class Int4Weight(QuantWeight):
    def __init__(self, qt: QTensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if qt.group_size not in INT4_GROUP_SIZES or qt.shape[1] % qt.group_size:
            raise UnsupportedModelError(f"int4 group size {qt.group_size} on width {qt.shape[1]}",
                                        f"int4 kernels take groups of {INT4_GROUP_SIZES} dividing the width")
        self.out_features, self.in_features = n, k = qt.shape
        self.group_size = qt.group_size
        device = torch.device(device)
        pad = -n % _ROW_BLOCK
        q = qt.q.to(torch.int32)
        scale, offset = qt.scale.float(), qt.offset.float() if qt.offset is not None else torch.zeros_like(qt.scale)
        if pad:
            q = torch.cat([q, torch.full((pad, k), 8, dtype=torch.int32)])
            scale = torch.cat([scale, torch.zeros(pad, scale.shape[1])])
            offset = torch.cat([offset, torch.zeros(pad, offset.shape[1])])
        # tinygemm's convention: w = (q - 8) * scale + zero
        zeros = torch.stack([scale, offset + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.cuda_kernel = device.type == "cuda"
        if self.cuda_kernel:
            q8 = q.to(torch.uint8)
            packed_in = (q8[:, ::2] << 4 | q8[:, 1::2]).to(device)
            tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_in, tiles)
            dtype = torch.bfloat16
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self.register_buffer("packed", packed.to(device))
        self.register_buffer("scales_and_zeros", zeros.to(device=device, dtype=dtype))
        self.dequant_prefill = not self.cuda_kernel and cpu_int4_block() is not None

    @property
    def label(self) -> str:
        return f"int4-g{self.group_size}"

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        if self.cuda_kernel:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(sz.dtype), self.packed, self.group_size, sz).to(x2.dtype)
        else:
            sz = sz if sz.dtype == x2.dtype else sz.to(x2.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, sz)
        return y[:, :self.out_features] if y.shape[1] != self.out_features else y

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = _flat(x)
        if self.dequant_prefill and x2.shape[0] >= DEQUANT_MIN_TOKENS:
            y = self._dense(x2)
        else:
            y = self._kernel(x2)
        return _finish(y, x, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        block = None if self.cuda_kernel else cpu_int4_block()
        if block is None:  # x = I recovers W^T through the kernel itself
            eye = torch.eye(k, dtype=self.scales_and_zeros.dtype, device=self.packed.device)
            return self._kernel(eye).t().to(dtype).contiguous()
        q = _unpack_cpu_int4(self.packed, k, block)[:n]
        sz = self.scales_and_zeros[:, :n].to(dtype)                   # [K/g, N, 2]
        scale = sz[..., 0].t()[:, :, None]
        offset = (sz[..., 1].t() - 8 * sz[..., 0].t())[:, :, None]
        return (q.view(n, k // g, g).to(dtype) * scale + offset).view(n, k)


# ---- int8 values with group scales, as two int4 planes -------------------------------------------------
class Int8GroupWeight(QuantWeight):
    def __init__(self, qt: QTensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.group_size = qt.group_size
        v = qt.q.to(torch.int16)
        hi, lo = v >> 4, v & 15                                        # v = lo + 16 hi, hi in -8..7
        offset = qt.offset if qt.offset is not None else torch.zeros_like(qt.scale)
        self.lo = Int4Weight(QTensor(lo.to(torch.uint8), qt.scale, offset, 4, qt.group_size), dtype, device)
        self.hi = Int4Weight(QTensor((hi + 8).to(torch.uint8), 16 * qt.scale, -128 * qt.scale, 4, qt.group_size),
                             dtype, device)

    @property
    def label(self) -> str:
        return f"int8-g{self.group_size}"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = _flat(x)
        if self.lo.dequant_prefill and x2.shape[0] >= DEQUANT_MIN_TOKENS:
            y = self._dense(x2)
        else:
            y = self.lo._kernel(x2) + self.hi._kernel(x2)
        return _finish(y, x, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.lo.dequantize(dtype) + self.hi.dequantize(dtype)


# ---- fp8 e4m3 storage ----------------------------------------------------------------------------------
class Fp8Weight(QuantWeight):
    """Storage only: this CPU (and GPUs before Ada/Hopper) has no fp8 math, so each call upcasts."""

    def __init__(self, qt: QTensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.register_buffer("q", _aligned(qt.q.to(device=device, dtype=torch.float8_e4m3fn)))
        self.register_buffer("scale", qt.scale.reshape(-1, 1).to(device=device, dtype=dtype))

    @property
    def label(self) -> str:
        return "fp8-e4m3"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _finish(self._dense(_flat(x)), x, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.q.to(dtype) * self.scale.to(dtype)


# ---- thrifty's own CPU kernel (thrifty.native), for bf16 compute ------------------------------------------
class NativeWeight(QuantWeight):
    """4- or 8-bit values with a float16 scale (and min) per group, on `native.qgemv` for few-token steps.

    qgemv quantizes the activations to int8 (one scale per 32 values), so it serves bf16 compute, which is
    approximate anyway; float32 compute keeps the exact torch-kernel formats above.
    """

    def __init__(self, qt: QTensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits, self.group_size = qt.bits, qt.group_size
        q = native.pack_int4(qt.q) if qt.bits == 4 else qt.q.to(torch.int8)
        self.register_buffer("packed", _aligned(q.to(device)))
        self.register_buffer("scales", qt.scale.to(device=device, dtype=torch.float16).contiguous())
        self.register_buffer("mins", None if qt.offset is None else
                             qt.offset.to(device=device, dtype=torch.float16).contiguous())
        self._refresh()

    def _refresh(self) -> None:
        # the kernel's operands as a plain attribute: each buffer lookup goes through nn.Module.__getattr__, three
        # per call, ~100 calls a decode step
        self._operands = (self.packed, self.scales, self.mins)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._refresh()                      # .to() and friends replace the buffers
        return self

    @staticmethod
    def takes(qt: QTensor, dtype: torch.dtype, device: torch.device) -> bool:
        """bf16 compute on a CPU where qgemv runs, a shape it takes, scales and mins that float16 holds."""
        if dtype != torch.bfloat16 or device.type != "cpu" or qt.kind != "int" or qt.bits not in (4, 8):
            return False
        if not native.supports(qt.shape[1], qt.group_size) or not native.available():
            return False
        return all(_fits_fp16(t) for t in (qt.scale, qt.offset) if t is not None)

    @property
    def label(self) -> str:
        if self.bits == 4:
            return f"int4-g{self.group_size}"
        return "int8" if self.group_size == self.in_features else f"int8-g{self.group_size}"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x if x.dim() == 2 else _flat(x)
        if x2.shape[0] >= NATIVE_DEQUANT_MIN_TOKENS:
            return _finish(self._dense(x2), x, bias)
        y = native.qgemv(x2, *self._operands, bias, self.bits, self.group_size)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        written = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32   # what the kernel writes
        return native.qdequant(self.packed, self.scales, self.mins, self.bits, self.group_size, written).to(dtype)

    def gather_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dequantize(dtype)[ids] without dequantizing the other rows (an embedding lookup in a tied table):
        8-bit symmetric values only, the tied head's format."""
        if self.bits != 8 or self.mins is not None:
            raise ValueError(f"gather_rows takes 8-bit symmetric weights, not {self.label}")
        n, g = ids.numel(), self.group_size
        q = self.packed[ids].float().view(n, self.in_features // g, g)
        w = (q * self.scales[ids].float()[:, :, None]).view(n, self.in_features)
        return w if dtype == torch.float32 else w.to(dtype)

    def reference_dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The same in torch ops: the tests' reference for `native.qdequant`."""
        q = native.unpack_int4(self.packed) if self.bits == 4 else self.packed
        n, k, g = self.out_features, self.in_features, self.group_size
        w = q.to(torch.float32).view(n, k // g, g) * self.scales.float()[:, :, None]
        if self.mins is not None:
            w = w + self.mins.float()[:, :, None]
        return w.view(n, k).to(dtype)


def _fits_fp16(t: torch.Tensor) -> bool:
    """Every value is finite in float16: normal ones keep 0.05 %; subnormal ones (|v| < 6.1e-5, the scales of
    nearly constant groups) are off by at most 3e-8, absolute."""
    return bool((t.abs() <= 65504).all())


def pack(qt: QTensor, dtype: torch.dtype, device: torch.device | str = "cpu") -> QuantWeight:
    """The kernel format for a QTensor."""
    device = torch.device(device)
    if NativeWeight.takes(qt, dtype, device):
        return NativeWeight(qt, dtype, device)
    if qt.kind == "fp8":
        return Fp8Weight(qt, dtype, device)
    if qt.bits == 8 and qt.per_channel and qt.offset is None:
        return Int8Weight(qt, dtype, device)
    if qt.bits == 4:
        return Int4Weight(qt, dtype, device)
    if qt.bits == 8 and qt.group_size in INT4_GROUP_SIZES:
        return Int8GroupWeight(qt, dtype, device)
    raise UnsupportedModelError(f"no kernel for {qt.kind}{qt.bits} weights with group size {qt.group_size}",
                                "use int8 per channel or int4 with groups of 32, 64, 128 or 256")
