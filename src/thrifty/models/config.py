"""The architecture hyper-parameters that every file format is read into."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: str            # "qwen2", "llama", "gemma3"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qkv bias (Qwen2)
    sliding_window: int | None = None
    name: str = ""

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads
