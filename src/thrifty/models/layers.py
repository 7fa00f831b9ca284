"""Building blocks shared by the architectures: RMSNorm, rotary embedding, linear layers, SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thrifty import native
from thrifty.ops import precision


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as the reference implementations do, then cast back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.offset = offset  # Gemma stores (weight - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.is_contiguous() and native.runs(x):
            return native.rms_norm(x, self.weight, self.eps, self.offset)
        return self.reference(x)

    def add_forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += h (in place: the residual stream), then the norm of it; one native call where it runs."""
        if h.dim() == 2 and h.is_contiguous() and residual.is_contiguous() and h.dtype == residual.dtype \
                and native.runs(h):
            return native.add_rms_norm_(h, residual, self.weight, self.eps, self.offset)
        return self(residual.add_(h))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.weight.float() + self.offset)).to(dtype)
        return self.weight * h.to(dtype)


class RotaryEmbedding:
    """Rotary position embedding, "neox" layout (rotate the two halves of each head), as Qwen2 and HF Llama.

    A plain object, not a module: it holds no weights, so building the model on the meta device loses nothing.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, shaped [T, 1, head_dim]: computed once per forward, used by every layer."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on q [T, H, D] and k [T, Hkv, D]; the fused kernel works in place (on a projection's fresh output)."""
    if native.runs(q) and cos.dtype == q.dtype:
        native.rope_(q, k, cos, sin)
        return q, k
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


class Linear(nn.Module):
    """y = x W^T + b. The one place weight formats plug in.

    Dense formats (bf16, fp32) keep `weight`. A quantized format replaces it with `qweight`, a packed module
    from thrifty.quant.kernels whose forward(x, bias) runs the format's kernel. Loading a quantized
    checkpoint goes: `expect_quantized()` on the meta model (no dense weight is ever allocated), `stage()`
    each shard as it streams in (a QTensor), then `finalize(pack)` checks that every shard came and packs them.
    """

    min_rows = 1  # deterministic mode raises it to 2 on dense weights (engine/determinism.py)

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.qweight: nn.Module | None = None
        # qweight.forward as a plain attribute: a submodule lookup goes through nn.Module.__getattr__, and a decode
        # step makes one per linear layer (~100)
        self._packed_forward = None
        self._staged: dict[str | None, object] | None = None  # shard -> QTensor while loading

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed_forward is not None:  # the packed weight's forward, not __call__: no hooks live there
            return self._packed_forward(x, self.bias)
        return precision.linear(x, self.weight, self.bias, self.min_rows)

    # ---- weight formats ---------------------------------------------------------------------------------
    @property
    def shards(self) -> dict[str | None, tuple[int, int]]:
        """Output-row ranges of the projections stacked in this weight (one unnamed one for a plain Linear)."""
        return {None: (0, self.out_features)}

    @property
    def weight_format(self) -> str:
        if self.qweight is not None:
            return self.qweight.label
        return "pending" if self.weight is None else str(self.weight.dtype).removeprefix("torch.")

    @property
    def weight_bytes(self) -> int:
        if self.qweight is not None:
            return self.qweight.nbytes
        return self.weight.nbytes if self.weight is not None else 0

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense matrix (dequantized when quantized)."""
        if self.qweight is not None:
            return self.qweight.dequantize(dtype)
        return self.weight.to(dtype)

    def set_quantized(self, qweight: nn.Module) -> None:
        """Replace the dense weight with a packed one of the same shape."""
        shape = (qweight.out_features, qweight.in_features)
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight of shape {shape} for a {self.out_features}x{self.in_features} layer")
        self.weight = None
        self.qweight = qweight
        self._packed_forward = qweight.forward
        self._staged = None

    def expect_quantized(self) -> None:
        """Drop the dense weight before allocation; shards then arrive through `stage`."""
        self.weight = None
        self.qweight = None
        self._packed_forward = None
        self._staged = {}

    def stage(self, shard: str | None, value) -> None:
        """Keep one quantized shard (anything with `.shape` [rows, in_features]) until `finalize`."""
        from thrifty.errors import ModelFileError

        if self._staged is None:
            raise ValueError("stage() on a layer that does not expect quantized weights")
        if shard not in self.shards:
            raise ModelFileError(f"unknown shard {shard!r}; this layer stacks {list(self.shards)}", "")
        lo, hi = self.shards[shard]
        if tuple(value.shape) != (hi - lo, self.in_features):
            raise ModelFileError(f"weight shard {shard or 'weight'} has shape {tuple(value.shape)}, the model "
                                 f"expects {(hi - lo, self.in_features)}", "check that the checkpoint fits the model")
        self._staged[shard] = value

    def finalize(self, pack) -> None:
        """pack(list of staged shards in row order) -> packed module. Every shard must have been staged."""
        from thrifty.errors import ModelFileError

        missing = [str(s) for s in self.shards if s not in (self._staged or {})]
        if missing:
            raise ModelFileError(f"weights missing from the checkpoint: shard(s) {', '.join(missing)}",
                                 "check that the checkpoint is complete")
        self.set_quantized(pack([self._staged[s] for s in self.shards]))


class MergedLinear(Linear):
    """Several projections of the same input stacked in one weight (q|k|v, gate|up): one matmul instead of three.

    `shards` names the parts and their output widths, in order; `load_shard` fills one part.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shards.values()), bias)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, width in shards.items():
            self.offsets[name] = (start, start + width)
            start += width

    @property
    def shards(self) -> dict[str | None, tuple[int, int]]:
        return dict(self.offsets)

    def load_shard(self, shard: str, param: str, value: torch.Tensor) -> None:
        if param == "weight" and self._staged is not None:
            self.stage(shard, value)
            return
        lo, hi = self.offsets[shard]
        target = self.weight if param == "weight" else self.bias
        if target is None or target[lo:hi].shape != value.shape:
            from thrifty.errors import ModelFileError

            expected = tuple(target[lo:hi].shape) if target is not None else None
            raise ModelFileError(f"shard {shard}.{param}: expected shape {expected}, got {tuple(value.shape)}",
                                 "check that config.json describes these weights")
        target.data[lo:hi].copy_(value)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return [y[..., lo:hi] for lo, hi in self.offsets.values()]


class SwiGLU(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x)), gate and up in one matmul; act silu (SwiGLU) or, with any
    other name, gelu with the tanh approximation (GeGLU, Gemma)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size})
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.dim() == 2 and native.runs(gate_up):
            return self.down_proj(native.act_mul(gate_up, gelu=self.act is not F.silu))
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(self.act(gate) * up)
