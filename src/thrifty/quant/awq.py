"""AWQ: activation-aware scaling. Input channels that carry large activations matter most; scaling such a
channel up in the weight (and down in what feeds it) before rounding shrinks its relative rounding error.

Following Lin et al. (2023): per group of linear layers that share an input, search s = mean|x|^a over a grid of
a in [0, 1), minimising || X W^T - (X / s) Q(W s)^T ||^2 on calibration inputs; fold 1/s into the operation that
produces the input (an RMSNorm weight, the rows of v_proj or up_proj), so the float function is unchanged.
With grouped-query attention, the o_proj channels that read the same v row share one scale. Then (int4) a
clipping search per output row and group: shrink the [min, max] range by a ratio in [0.5, 1] where that lowers
the group's output error.
"""
from __future__ import annotations

from typing import Callable

import torch

from thrifty.quant.qtensor import QTensor, int4_range, quantize_int4, quantize_rtn

GRID = 20
CLIP_RATIOS = [1.0 - 0.05 * i for i in range(11)]
CLIP_TOKENS = 256


def _subsample(x: torch.Tensor, rows: int, seed: int = 0) -> torch.Tensor:
    if x.shape[0] <= rows:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]
    return x[idx]


def _search_rows(n: int, k: int) -> int:
    """Calibration rows for the scale search: fewer for big matrices (the output head)."""
    return int(min(1024, max(128, 2e9 // (n * k))))


def search_scale(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int | None,
                 tie: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The per-input-channel scale s [K] (s = 1 where no grid point beats plain rounding)."""
    x_mag = x.abs().mean(0).clamp(min=1e-6)
    if tie is not None:
        x_mag = tie(x_mag)
    xs = _subsample(x, _search_rows(*w.shape))
    ref = xs @ w.t()
    best, best_s = float("inf"), torch.ones_like(x_mag)
    for i in range(GRID):
        a = i / GRID
        s = x_mag.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        wq = quantize_rtn(w * s, bits, group_size).dequantize() / s
        loss = float((xs @ wq.t() - ref).pow(2).mean())
        if loss < best:
            best, best_s = loss, s
    return best_s


def search_clip(x: torch.Tensor, w: torch.Tensor, group_size: int, row_chunk: int = 1024) -> QTensor:
    """int4 with each (row, group) range shrunk by the ratio with the least output error on calibration inputs."""
    n, k = w.shape
    g = k // group_size
    xs = _subsample(x, CLIP_TOKENS, seed=1).view(-1, g, group_size)
    wg = w.view(n, g, group_size)
    lo_best, hi_best = wg.amin(-1).clone(), wg.amax(-1).clone()
    for r0 in range(0, n, row_chunk):
        wc = wg[r0:r0 + row_chunk]
        ref = torch.einsum("tgk,rgk->trg", xs, wc)
        lo0, hi0 = wc.amin(-1), wc.amax(-1)
        best_err = torch.full(lo0.shape, float("inf"))
        for ratio in CLIP_RATIOS:
            lo, hi = lo0 * ratio, hi0 * ratio
            scale, offset = int4_range(wc.reshape(wc.shape[0], k), group_size, lo, hi)
            qv = torch.round((wc - offset[..., None]) / scale[..., None]).clamp_(0, 15)
            deq = qv * scale[..., None] + offset[..., None]
            err = (torch.einsum("tgk,rgk->trg", xs, deq) - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            lo_best[r0:r0 + row_chunk] = torch.where(better, lo, lo_best[r0:r0 + row_chunk])
            hi_best[r0:r0 + row_chunk] = torch.where(better, hi, hi_best[r0:r0 + row_chunk])
    scale, offset = int4_range(w, group_size, lo_best, hi_best)
    return quantize_int4(w, group_size, scale, offset)


def quantize_weight(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int | None) -> QTensor:
    """The final rounding of an (already scaled) weight: clip search for int4, plain rounding for int8."""
    return search_clip(x, w, group_size) if bits == 4 else quantize_rtn(w, bits, group_size)


def gqa_tie(num_heads: int, num_kv_heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Average o_proj's per-channel statistic over the query heads that share a KV head (they read one v row)."""
    groups = num_heads // num_kv_heads

    def tie(v: torch.Tensor) -> torch.Tensor:
        shared = v.view(num_kv_heads, groups, head_dim).mean(1, keepdim=True)
        return shared.expand(num_kv_heads, groups, head_dim).reshape(-1)

    return tie
