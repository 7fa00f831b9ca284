"""The Qwen2 / Llama family: RMSNorm, RoPE, grouped-query attention, SwiGLU, optional qkv bias, tied or untied head.

The forward takes a flat batch of tokens with their positions; the attention layers find the step's metadata
(slots of a paged KV cache) in the forward context the runner sets, so one call serves any mix of prefill chunks
and decodes. Weights arrive under Hugging Face names (models/causal_lm.py maps them onto the fused layers).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from thrifty.models.causal_lm import CausalLM
from thrifty.models.config import ModelConfig
from thrifty.models.layers import Linear, MergedLinear, RMSNorm, RotaryEmbedding, SwiGLU, rotate_qk
from thrifty.ops.attention import paged_attention


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": q, "k": kv, "v": kv}, bias=config.attention_bias)
        self.o_proj = Linear(q, config.hidden_size)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)   # q, k, v in qkv_proj's output

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        # q | k | v as head views of the one projection: two calls where slicing and shaping each took six
        q, k, v = self.qkv_proj(x).reshape(t, -1, self.head_dim).split(self.heads, dim=1)
        q, k = rotate_qk(q, k, cos, sin)
        out = paged_attention(q, k, v, self.layer, self.scale)
        return self.o_proj(out.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The layer on hidden states x, x unchanged (the quantizers run the layers one at a time)."""
        h, residual = self.residual_forward(None, x.clone(), cos, sin)
        return residual + h

    def residual_forward(self, h: torch.Tensor | None, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's path. h: the previous layer's output, not yet added (None at the first layer); residual:
        the stream, updated in place. Each norm takes the add before it in one call (RMSNorm.add_forward), which
        saves two ops a layer of a decode step; returns this layer's output, not yet added, and the stream."""
        x = self.input_layernorm(residual) if h is None else self.input_layernorm.add_forward(h, residual)
        x = self.self_attn(x, cos, sin)
        return self.mlp(self.post_attention_layernorm.add_forward(x, residual)), residual


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        residual, h = self.embed_tokens(input_ids), None
        cos, sin = self.rotary.cos_sin(positions, residual.dtype)
        for layer in self.layers:
            h, residual = layer.residual_forward(h, residual, cos, sin)
        return self.norm.add_forward(h, residual)


class Qwen2ForCausalLM(CausalLM):
    """Also serves plain Llama-family checkpoints (no qkv bias)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self._add_head()
