"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's reconstruction loss (H = X^T X over calibration inputs).

Following Frantar et al. (2022): Cholesky factor of H^-1 (with 1 % damping), blocks of 128 columns with lazy
updates of the rest; int4 group parameters (min/max of the group) are taken when the quantizer reaches a group's
first column, from the weights as updated so far; int8 uses one symmetric scale per row, fixed up front.

With act-order (the default) columns are quantized in order of decreasing Hessian diagonal, the inputs that carry
the most energy first, while the rest can still absorb their error. Groups stay the contiguous column ranges the
kernels read ("static groups"): each group's range is fixed up front from the original weights.
"""
from __future__ import annotations

import torch

from thrifty.quant.qtensor import QTensor, int4_range

DAMP = 0.01
BLOCK = 128
ROW_CHUNK = 16384


def hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).float()
    return (x.t() @ x) / max(1, x.shape[0])


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    h = h.clone()
    damp = DAMP * torch.diag(h).mean().clamp(min=1e-8)
    for attempt in range(6):
        try:
            hd = h + damp * (10 ** attempt) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            lower = torch.linalg.cholesky(hd)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the calibration Hessian is not positive definite even with damping")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None,
                  act_order: bool = True) -> QTensor:
    """w [N, K], h [K, K] -> QTensor (int8 per channel, or int4 asymmetric with `group_size`)."""
    w = w.float().clone()
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    k = w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    fixed = int4_range(w, group_size) if act_order and bits == 4 else None
    hinv = _inverse_cholesky(h[perm][:, perm])
    wp = w[:, perm]
    parts = [_quantize_rows(wp[r:r + ROW_CHUNK], hinv, bits, group_size, perm,
                            None if fixed is None else (fixed[0][r:r + ROW_CHUNK], fixed[1][r:r + ROW_CHUNK]))
             for r in range(0, w.shape[0], ROW_CHUNK)]
    qt = QTensor.cat(parts)
    q = torch.empty_like(qt.q)
    q[:, perm] = qt.q
    return QTensor(q, qt.scale, qt.offset, qt.bits, qt.group_size)


def _quantize_rows(w: torch.Tensor, hinv: torch.Tensor, bits: int, group_size: int | None, perm: torch.Tensor,
                   fixed: tuple[torch.Tensor, torch.Tensor] | None) -> QTensor:
    """w's columns (and hinv) in quantization order; column i is original column perm[i]. `fixed`: int4 group
    ranges set up front (act-order); None: each group's range when its first column comes up."""
    n, k = w.shape
    w = w.clone()
    q = torch.zeros(n, k, dtype=torch.int8 if bits == 8 else torch.uint8)
    if bits == 8:
        scale8 = (w.abs().amax(1) / 127.0).clamp(min=1e-12)
        scales, offsets = scale8[:, None], None
    elif fixed is not None:
        scales, offsets = fixed
    else:
        groups = k // group_size
        scales, offsets = torch.zeros(n, groups), torch.zeros(n, groups)
    group_of = perm // group_size if group_size else None
    block = max(BLOCK, group_size or 0)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if bits == 4 and fixed is None and col % group_size == 0:
                s, o = int4_range(w1[:, i:i + group_size], group_size)
                scales[:, col // group_size], offsets[:, col // group_size] = s[:, 0], o[:, 0]
            x = w1[:, i]
            if bits == 8:
                qi = torch.round(x / scale8).clamp_(-127, 127)
                deq = qi * scale8
            else:
                g = int(group_of[col])
                qi = torch.round((x - offsets[:, g]) / scales[:, g]).clamp_(0, 15)
                deq = qi * scales[:, g] + offsets[:, g]
            q[:, col] = qi.to(q.dtype)
            e = (x - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QTensor(q, scales, offsets, bits, group_size or k)
