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
    sliding_window: int | None = None     # tokens a local layer sees, itself included
    sliding_window_pattern: int | None = None  # every Nth layer is global, the rest local (Gemma 3: 6); None: no
                                               # layer is local (Qwen2 configs name a window they do not use)
    rope_local_theta: float | None = None      # RoPE base of the local layers (Gemma 3: 10,000)
    query_pre_attn_scalar: float | None = None  # queries scaled by its -1/2 power instead of head_dim's
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    name: str = ""

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer; None for a layer that sees its whole context."""
        if self.sliding_window is None or self.sliding_window_pattern is None:
            return None
        return None if (layer + 1) % self.sliding_window_pattern == 0 else self.sliding_window

    @property
    def layer_windows(self) -> list[int | None]:
        return [self.layer_window(i) for i in range(self.num_layers)]

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads
