"""Building blocks shared by the architectures: RMSNorm, rotary embedding, linear layers, SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as the reference implementations do, then cast back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.offset = offset  # Gemma stores (weight - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class Linear(nn.Module):
    """y = x W^T + b. The one place weight formats plug in (quantized formats replace `weight`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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

    def load_shard(self, shard: str, param: str, value: torch.Tensor) -> None:
        lo, hi = self.offsets[shard]
        target = self.weight if param == "weight" else self.bias
        if target is None or target[lo:hi].shape != value.shape:
            raise ValueError(f"shard {shard}.{param}: expected shape {tuple(target[lo:hi].shape) if target is not None else None},"
                             f" got {tuple(value.shape)}")
        target.data[lo:hi].copy_(value)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return [y[..., lo:hi] for lo, hi in self.offsets.values()]


class SwiGLU(nn.Module):
    """The gated MLP: down(silu(gate(x)) * up(x)), gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate": intermediate_size, "up": intermediate_size})
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(self.act(gate) * up)
