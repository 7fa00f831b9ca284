"""AWQ: activation-aware scaling. Input channels that carry large activations matter most; scaling such a
channel up in the weight (and down in what feeds it) before rounding shrinks its relative rounding error.

Following Lin et al. (2023): per group of linear layers that share an input, search s = mean|x|^a over a grid of
a in [0, 1), minimising || X W^T - (X / s) Q(W s)^T ||^2 on calibration inputs; fold 1/s into the operation that
produces the input (an RMSNorm weight, the rows of v_proj or up_proj), so the float function is unchanged.
With grouped-query attention, the o_proj channels that read the same v row share one scale. Then (int4) a
clipping search per output row and group: shrink the [min, max] range where that lowers the group's output
error; last, each group's scale and offset get the gain that makes its output unbiased (see `unbias`).

Both losses are quadratic in the weight error E: ||X E^T||^2 = tr(E H E^T) with H = X^T X, so they are
computed from H (all calibration tokens, at the cost of K tokens), and a group's clipping error from H's
diagonal block for that group. That is the same objective as on the tokens themselves, not error compensation:
no weight moves off its rounding grid to make up for another's error (that is GPTQ).
"""
from __future__ import annotations

from typing import Callable

import torch

from thrifty.quant.qtensor import QTensor, quantize_int4, quantize_rtn

GRID = 20
CLIP_STEP = 0.05
CLIP_MIN = 0.5
CLIP_PASSES = 3          # pass 0: lo and hi shrink together; then hi alone, lo alone, hi, ... (coordinate search;
                         # 0.5B g32 ppl, dense-fp32 eval: 1 pass 7.573, 3 passes 7.546; 5 at step 0.025 no better, 1.6x time)
SEARCH_FLOPS = 4e10      # per grid point; larger weights (the output head) search on a fixed sample of rows

Loss = Callable[[torch.Tensor], float]


def gram(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X / T [K, K] over all calibration tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (x.t() @ x) / max(1, x.shape[0])


def output_error(e: torch.Tensor, h: torch.Tensor, row_chunk: int = 4096) -> float:
    """Mean over rows of e_r H e_r^T: the mean squared output error of weight error e [N, K]."""
    total = 0.0
    for r in range(0, e.shape[0], row_chunk):
        ec = e[r:r + row_chunk]
        total += float(((ec @ h) * ec).sum())
    return total / e.shape[0]


def sample_rows(n: int, k: int, seed: int = 0) -> torch.Tensor | None:
    """A fixed random subset of output rows when n * k * k flops per loss would exceed the budget, else None."""
    keep = int(SEARCH_FLOPS // (2 * k * k))
    if keep >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


def gram_loss(w: torch.Tensor, h: torch.Tensor, rows: torch.Tensor | None = None) -> Loss:
    """loss(wq): output error of candidate wq against w (both taken on `rows` when given)."""
    ref = w if rows is None else w[rows]
    return lambda wq: output_error(wq - ref, h)


def search_scale(x_mag: torch.Tensor, w: torch.Tensor, bits: int, group_size: int | None, loss: Loss,
                 rows: torch.Tensor | None = None,
                 tie: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The per-input-channel scale s [K] whose rounded Q(W s) / s has the least `loss` (s = 1 at a = 0).

    `loss` takes the candidate weight in W's own input space (restricted to `rows` when given).
    (Adding AutoAWQ's "duo" candidates mean|x|^a / mean|w / group max|^(1 - a) took 1.8x the time and gave the
    0.5B g32 a worse ppl, 7.511 vs 7.435, dense-fp32 eval.)"""
    x_mag = x_mag.clamp(min=1e-6)
    if tie is not None:
        x_mag = tie(x_mag)
    wr = w if rows is None else w[rows]
    best, best_s = float("inf"), torch.ones_like(x_mag)
    for i in range(GRID):
        s = x_mag.pow(i / GRID)
        s = s / (s.max() * s.min()).sqrt()
        err = loss(quantize_rtn(wr * s, bits, group_size).dequantize() / s)
        if err < best:
            best, best_s = err, s
    return best_s


def group_grams(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks of H, one per quantization group: [G, group, group]."""
    g = h.shape[0] // group_size
    return torch.stack([h[i * group_size:(i + 1) * group_size, i * group_size:(i + 1) * group_size]
                        for i in range(g)])


def _fake_int4(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)[..., None]
    return torch.round((wg - lo[..., None]) / scale).clamp_(0, 15) * scale + lo[..., None]


def _group_error(wg: torch.Tensor, deq: torch.Tensor, hg: torch.Tensor) -> torch.Tensor:
    """[rows, G] output error of each (row, group): e H_g e^T."""
    e = (deq - wg).transpose(0, 1)                      # [G, rows, group]
    return ((e @ hg) * e).sum(-1).transpose(0, 1)


def _clip_candidates() -> list[float]:
    n = int(round((1.0 - CLIP_MIN) / CLIP_STEP))
    return [1.0 - CLIP_STEP * i for i in range(n + 1)]


def search_clip(w: torch.Tensor, hg: torch.Tensor, group_size: int, row_chunk: int = 4096) -> QTensor:
    """int4 with each (row, group) range [lo, hi] shrunk where that lowers the group's output error."""
    n, k = w.shape
    g = k // group_size
    wg_all = w.view(n, g, group_size)
    lo_best, hi_best = wg_all.amin(-1).clone(), wg_all.amax(-1).clone()
    ratios = _clip_candidates()
    for r0 in range(0, n, row_chunk):
        wg = wg_all[r0:r0 + row_chunk]
        lo0, hi0 = lo_best[r0:r0 + row_chunk].clone(), hi_best[r0:r0 + row_chunk].clone()
        t_lo, t_hi = torch.ones_like(lo0), torch.ones_like(hi0)
        best_err = torch.full(lo0.shape, float("inf"))
        for p in range(CLIP_PASSES):
            for ratio in ratios:
                c_lo = torch.full_like(t_lo, ratio) if p % 2 == 0 else t_lo
                c_hi = torch.full_like(t_hi, ratio) if p == 0 or p % 2 == 1 else t_hi
                err = _group_error(wg, _fake_int4(wg, lo0 * c_lo, hi0 * c_hi), hg)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                t_lo, t_hi = torch.where(better, c_lo, t_lo), torch.where(better, c_hi, t_hi)
        lo_best[r0:r0 + row_chunk], hi_best[r0:r0 + row_chunk] = lo0 * t_lo, hi0 * t_hi
    scale = ((hi_best - lo_best) / 15.0).clamp(min=1e-10)
    return quantize_int4(w, group_size, scale, lo_best)


def unbias(qt: QTensor, w: torch.Tensor, hg: torch.Tensor) -> QTensor:
    """Each group's (scale, offset) times the gain g = (w H w) / (q H w) over its block of H (exact in the
    format, same codes): the rounded group's output then regresses on the true one with slope 1.

    Least squares prefers ranges that shrink the weights (the 0.5B's gate|up rows came out ~1 % short of the
    float ones), which costs more perplexity than the error shows; the gain undoes the shrink and nothing else.
    (Judging each clip candidate after its own gain instead chose harsher clipping: 0.5B ppl 7.472 vs 7.435.)"""
    n, k = w.shape
    g = k // qt.group_size
    wt = w.float().view(n, g, qt.group_size).transpose(0, 1)          # [G, rows, group]
    qd = qt.dequantize().view(n, g, qt.group_size).transpose(0, 1)
    hw = wt @ hg
    num, den = (hw * wt).sum(-1), (hw * qd).sum(-1)
    gain = torch.where(den > 0, num / den.clamp(min=1e-30), torch.ones_like(num)).clamp(0.5, 2.0).transpose(0, 1)
    return QTensor(qt.q, qt.scale * gain, qt.offset * gain, qt.bits, qt.group_size, qt.kind)


def quantize_weight(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None) -> QTensor:
    """The final rounding of an (already scaled) weight: clip search and unbias for int4, plain rounding for int8."""
    if bits != 4:
        return quantize_rtn(w, bits, group_size)
    hg = group_grams(h, group_size)
    qt = search_clip(w, hg, group_size)
    return unbias(qt, w, hg)


def gqa_tie(num_heads: int, num_kv_heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Average o_proj's per-channel statistic over the query heads that share a KV head (they read one v row)."""
    groups = num_heads // num_kv_heads

    def tie(v: torch.Tensor) -> torch.Tensor:
        shared = v.view(num_kv_heads, groups, head_dim).mean(1, keepdim=True)
        return shared.expand(num_kv_heads, groups, head_dim).reshape(-1)

    return tie


# ---- one decoder layer ------------------------------------------------------------------------------------
# "attn": q|k|v's scale judged on the attention block's output (o_proj still in float), "proj": on q|k|v's own
# outputs (the paper's choice). 0.5B g32 ppl (dense-fp32 eval, 3 clip passes) 7.483 vs 7.546, bf16 7.276;
# quantizing takes 10 instead of 7.5 min. `thrifty eval ppl` of the result: 7.491; with `unbias` added, 7.447.
QKV_LOSS = "attn"


def _module_loss(lin, module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Loss:
    """Mean squared error of `module(x)` with a candidate weight for `lin` in place."""
    keep = lin.weight.data.clone()
    with torch.inference_mode():
        ref = module(x)

    def loss(wq: torch.Tensor) -> float:
        lin.weight.data.copy_(wq)
        try:
            with torch.inference_mode():
                return float((module(x) - ref).pow(2).mean())
        finally:
            lin.weight.data.copy_(keep)
    return loss


def choose_scale(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, bits: int, group: int | None,
                 loss: Loss | None = None, tie: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The scale for a weight reading inputs x (Gram matrix h): judged by `loss`, else by the Gram loss."""
    if loss is not None:
        return search_scale(x.abs().mean(0), w, bits, group, loss, tie=tie)
    rows = sample_rows(*w.shape)
    return search_scale(x.abs().mean(0), w, bits, group, gram_loss(w, h, rows), rows=rows, tie=tie)


def round_scaled(lin, h: torch.Tensor, s: torch.Tensor, bits: int, group: int | None) -> QTensor:
    """Round `lin`'s already scaled weight in place. Its inputs, scaled by 1/s, have Gram matrix H / (s s^T)."""
    qt = quantize_weight(lin.weight.data, h / (s[:, None] * s[None, :]), bits, group)
    lin.weight.data.copy_(qt.dequantize())
    return qt


def quantize_layer(layer, x_in: dict[str, torch.Tensor], config, bits: int, group: int | None,
                   attention: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, QTensor]:
    """Scale and round one Qwen2/Llama decoder layer in place; `x_in` holds each projection's float inputs,
    `attention(x)` runs the layer's attention block on the input_layernorm output. Returns QTensors by key."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    h = {key: gram(x) for key, x in x_in.items()}
    # 1. q|k|v read input_layernorm's output
    loss = _module_loss(qkv, attention, x_in["qkv"]) if QKV_LOSS == "attn" else None
    s = choose_scale(x_in["qkv"], qkv.weight, h["qkv"], bits, group, loss)
    layer.input_layernorm.weight.data /= s
    qkv.weight.data *= s
    # 2. o_proj reads attention outputs, linear in v's rows (shared by the query heads of a KV group)
    tie = gqa_tie(config.num_heads, config.num_kv_heads, config.head_dim)
    s_o = choose_scale(x_in["o"], o.weight, h["o"], bits, group, tie=tie)
    groups = config.num_heads // config.num_kv_heads
    s_v = s_o.view(config.num_kv_heads, groups, config.head_dim)[:, 0, :].reshape(-1)
    lo, hi = qkv.offsets["v"]
    qkv.weight.data[lo:hi] /= s_v[:, None]
    if qkv.bias is not None:
        qkv.bias.data[lo:hi] /= s_v
    o.weight.data *= s_o
    # 3. gate|up read post_attention_layernorm's output
    # (judged on the whole MLP's output instead, on 2,048 tokens: ppl 7.498 vs 7.483, dense-fp32 eval)
    s_gu = choose_scale(x_in["gate_up"], gate_up.weight, h["gate_up"], bits, group)
    layer.post_attention_layernorm.weight.data /= s_gu
    gate_up.weight.data *= s_gu
    # 4. down_proj reads silu(gate) * up: linear in up's rows
    s_d = choose_scale(x_in["down"], down.weight, h["down"], bits, group)
    lo, hi = gate_up.offsets["up"]
    gate_up.weight.data[lo:hi] /= s_d[:, None]
    down.weight.data *= s_d
    # v and up changed after q|k|v and gate|up were searched; their inputs did not, so rounding comes last.
    # (Rounding in order on recaptured inputs as GPTQ does, tried with a 4x larger search sample, measured no
    # better here: ppl 7.590 vs 7.554 at g32.)
    scales = {"qkv": s, "o": s_o, "gate_up": s_gu, "down": s_d}
    return {key: round_scaled(lin, h[key], scales[key], bits, group)
            for key, lin in {"qkv": qkv, "o": o, "gate_up": gate_up, "down": down}.items()}


def quantize_head(norm, head, x: torch.Tensor, bits: int, group: int | None) -> QTensor:
    """AWQ on the output head, its scale folded into the final norm (the loss on a fixed sample of its rows)."""
    h = gram(x)
    s = choose_scale(x, head.weight, h, bits, group)
    norm.weight.data /= s
    head.weight.data *= s
    return round_scaled(head, h, s, bits, group)
