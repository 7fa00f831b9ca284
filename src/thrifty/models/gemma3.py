"""Gemma 3 (text): Qwen2's skeleton with Gemma's differences.

- RMSNorms scale by (1 + weight), in float32, and there are four per layer: before and after attention,
  before and after the MLP (the "after" ones normalize the branch output before the residual add).
- q and k are RMS-normalized per head before RoPE; queries are scaled by query_pre_attn_scalar^-1/2.
- GeGLU MLP (gelu, tanh approximation); embeddings scaled by sqrt(hidden), rounded to the model's dtype as HF does.
- Local layers attend to a sliding window with their own RoPE base, interleaved with global layers
  (ModelConfig.layer_window); the output head is tied to the embeddings; optional final logit soft-capping.
"""
from __future__ import annotations

import torch
from torch import nn

from thrifty.models.causal_lm import CausalLM
from thrifty.models.config import ModelConfig
from thrifty.models.layers import Linear, MergedLinear, RMSNorm, RotaryEmbedding, SwiGLU, rotate_qk
from thrifty.ops.attention import paged_attention

GEMMA_NORM_OFFSET = 1.0  # Gemma stores weight - 1


def gemma_norm(size: int, config: ModelConfig) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps, offset=GEMMA_NORM_OFFSET)


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.window = config.layer_window(layer)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": q, "k": kv, "v": kv}, bias=config.attention_bias)
        self.o_proj = Linear(q, config.hidden_size)
        self.q_norm = gemma_norm(self.head_dim, config)
        self.k_norm = gemma_norm(self.head_dim, config)
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        # per-head norms over 2-D rows (the native kernel's shape); their outputs are fresh, so RoPE runs in place
        q = self.q_norm(q.reshape(-1, d).contiguous()).view(t, self.num_heads, d)
        k = self.k_norm(k.reshape(-1, d).contiguous()).view(t, self.num_kv_heads, d)
        q, k = rotate_qk(q, k, cos, sin)
        out = paged_attention(q, k, v.reshape(t, self.num_kv_heads, d), self.layer, self.scale, self.window)
        return self.o_proj(out.reshape(t, -1))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.is_local = config.layer_window(layer) is not None
        self.input_layernorm = gemma_norm(config.hidden_size, config)
        self.self_attn = Gemma3Attention(config, layer)
        self.post_attention_layernorm = gemma_norm(config.hidden_size, config)
        self.pre_feedforward_layernorm = gemma_norm(config.hidden_size, config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, activation="gelu_tanh")
        self.post_feedforward_layernorm = gemma_norm(config.hidden_size, config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_scale = config.hidden_size ** 0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = gemma_norm(config.hidden_size, config)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.rotary_local = RotaryEmbedding(config.head_dim, config.rope_local_theta or config.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        rope = {False: self.rotary.cos_sin(positions, x.dtype), True: self.rotary_local.cos_sin(positions, x.dtype)}
        for layer in self.layers:
            x = layer(x, *rope[layer.is_local])
        return self.norm(x)


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config)
        self._add_head()
