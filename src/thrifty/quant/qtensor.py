"""QTensor: a quantized weight matrix in its plain, kernel-independent form, and round-to-nearest quantizers.

    w[n, k] = scale[n, g] * q[n, k] + offset[n, g]        g = k // group_size

`q` holds small integers (int8: symmetric, no offset; int4: 0..15 with a float offset, the group minimum) or,
for fp8, e4m3 values with a per-row scale. Rows are independent, so the shards of a fused projection (q|k|v,
gate|up) are quantized apart and concatenated (`cat`), and a fused one is split back the same way (`rows`).
Kernels (thrifty.quant.kernels) pack a QTensor into their own layout; checkpoints store it as is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.errors import InvalidRequestError

INT4_GROUP_SIZES = (32, 64, 128, 256)
# The group `int4` and `thrifty quantize --bits 4` use when none is given: read off `thrifty bench quant`'s
# quality / speed frontier (bench/quant_frontier.py; README "Quantized weights" has the numbers). On the 0.5B,
# group 32 lost least for RTN, AWQ and GPTQ alike and decoded fastest (the kernel's one-group-per-chunk case).
DEFAULT_INT4_GROUP = 32
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(slots=True)
class QTensor:
    q: torch.Tensor                     # [N, K] int8 (bits 8, or 5/6-bit GGUF values) / uint8 0..15 / float8_e4m3fn
    scale: torch.Tensor                 # [N, K // group_size] float32
    offset: torch.Tensor | None         # [N, K // group_size] float32, or None (symmetric)
    bits: int                           # 4 or 8 (int), 8 for fp8
    group_size: int                     # K for one scale per row
    kind: str = "int"                   # "int" or "fp8"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        g = k // self.group_size
        w = self.q.to(torch.float32).view(n, g, self.group_size) * self.scale[:, :, None]
        if self.offset is not None:
            w = w + self.offset[:, :, None]
        return w.view(n, k).to(dtype)

    def rows(self, lo: int, hi: int) -> QTensor:
        return QTensor(self.q[lo:hi], self.scale[lo:hi], None if self.offset is None else self.offset[lo:hi],
                       self.bits, self.group_size, self.kind)

    @staticmethod
    def cat(parts: list[QTensor]) -> QTensor:
        first = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size, p.kind, p.offset is None, p.q.shape[1]) != \
                    (first.bits, first.group_size, first.kind, first.offset is None, first.q.shape[1]):
                raise InvalidRequestError(
                    "the shards of one fused projection are quantized differently "
                    f"({first.kind}{first.bits}/g{first.group_size} vs {p.kind}{p.bits}/g{p.group_size})",
                    "quantize q/k/v and gate/up with the same format")
        if len(parts) == 1:
            return first
        offset = None if first.offset is None else torch.cat([p.offset for p in parts])
        return QTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), offset,
                       first.bits, first.group_size, first.kind)

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(self.q.to(device), self.scale.to(device),
                       None if self.offset is None else self.offset.to(device), self.bits, self.group_size, self.kind)


# ---- checks --------------------------------------------------------------------------------------------
def check_format(bits: int, group_size: int | None, in_features: int | None = None) -> int | None:
    """Validate bits and group size; return the group size (None = per channel). Raises InvalidRequestError."""
    if bits not in (4, 8):
        raise InvalidRequestError(f"unsupported bits {bits}", "use 4 or 8", param="bits")
    if bits == 8:
        if group_size not in (None, 0, -1):
            raise InvalidRequestError(
                f"8-bit weights use one scale per output channel; group size {group_size} is not supported",
                "drop --group-size for 8 bits", param="group_size")
        return None
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidRequestError(f"unsupported int4 group size {group_size}",
                                  f"use one of {', '.join(map(str, INT4_GROUP_SIZES))}", param="group_size")
    if in_features is not None and in_features % group_size:
        raise InvalidRequestError(f"group size {group_size} does not divide the input width {in_features}",
                                  "pick a smaller group size", param="group_size")
    return group_size


# ---- round to nearest ----------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> QTensor:
    """Symmetric int8, one scale per output row (what `_weight_int8pack_mm` takes), or per group of
    `group_size` values (llama.cpp's Q8_0 is groups of 32)."""
    w = w.float()
    n, k = w.shape
    g = group_size or k
    wg = w.view(n, k // g, g)
    scale = (wg.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(wg / scale[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return QTensor(q.view(n, k), scale, None, 8, g)


def int4_range(w: torch.Tensor, group_size: int, lo: torch.Tensor | None = None,
               hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) [N, G] of the asymmetric 16-level grid over [lo, hi] (default: each group's min/max)."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    lo = wg.amin(-1) if lo is None else lo
    hi = wg.amax(-1) if hi is None else hi
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    return scale, lo


def quantize_int4(w: torch.Tensor, group_size: int, scale: torch.Tensor | None = None,
                  offset: torch.Tensor | None = None) -> QTensor:
    """Asymmetric int4 per group: q = round((w - min) / scale) in 0..15. A given (scale, offset) is used as is."""
    n, k = w.shape
    check_format(4, group_size, k)
    if scale is None:
        scale, offset = int4_range(w, group_size)
    wg = w.float().view(n, k // group_size, group_size)
    q = torch.round((wg - offset[:, :, None]) / scale[:, :, None]).clamp_(0, 15).to(torch.uint8)
    return QTensor(q.view(n, k), scale.float(), offset.float(), 4, group_size)


def quantize_fp8(w: torch.Tensor) -> QTensor:
    """float8 e4m3 with one float32 scale per row (the row's max maps to 448)."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QTensor(q, scale, None, 8, w.shape[1], kind="fp8")


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None) -> QTensor:
    group_size = check_format(bits, group_size, w.shape[1])
    return quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)
