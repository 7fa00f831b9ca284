"""Helpers to run thrifty's model on one sequence through the paged path, and the HF reference beside it."""
from __future__ import annotations

from pathlib import Path

import torch

from thrifty.ops.attention_metadata import AttentionMetadata
from thrifty.ops.forward_context import set_forward_context
from thrifty.engine.kv_cache import KVCacheSpec, PagedKVCache
from thrifty.models.config import ModelConfig
from thrifty.models.gguf_file import GGUFFile, hf_weights
from thrifty.models.loader import build_model


def load_thrifty(path: Path, dtype: torch.dtype = torch.float32):
    gguf = GGUFFile(path)
    config = gguf.model_config()
    return build_model(config, hf_weights(gguf, config), dtype, torch.device("cpu")), config


def load_hf(path: Path):
    """transformers' Qwen2ForCausalLM built from the same dequantized float32 weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    gguf = GGUFFile(path)
    c = gguf.model_config()
    hf_config = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_word_embeddings, attn_implementation="eager")
    model = Qwen2ForCausalLM(hf_config).float().eval()
    state = dict(hf_weights(gguf, c))
    if not c.attention_bias:  # HF's Qwen2 always has qkv biases: zero ones are the same function
        state |= {n: torch.zeros_like(p) for n, p in model.named_parameters() if n.endswith("_proj.bias")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in m for m in missing) and (not missing or c.tie_word_embeddings), missing
    return model


def load_hf_gemma3(path: Path, sliding_window: int | None = None):
    """transformers' Gemma3ForCausalLM built from the same dequantized float32 weights (norms as HF stores
    them, weight - 1); `sliding_window` overrides the file's."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gguf = GGUFFile(path)
    c = gguf.model_config()
    hf_config = Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        query_pre_attn_scalar=int(c.query_pre_attn_scalar), sliding_window=sliding_window or c.sliding_window,
        sliding_window_pattern=c.sliding_window_pattern, final_logit_softcapping=c.final_logit_softcapping,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
                         "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}},
        tie_word_embeddings=True, attn_implementation="eager")
    model = Gemma3ForCausalLM(hf_config).float().eval()
    missing, unexpected = model.load_state_dict(dict(hf_weights(gguf, c)), strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in m for m in missing), missing
    model.tie_weights()
    return model


class SingleSequence:
    """Runs a model over one growing sequence with a paged KV cache whose blocks are deliberately shuffled."""

    def __init__(self, model, config: ModelConfig, block_size: int = 4, num_blocks: int = 256, seed: int = 0):
        spec = KVCacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, block_size, num_blocks,
                           next(model.parameters()).dtype)
        self.cache = PagedKVCache(spec)
        self.model, self.block_size = model, block_size
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.table: list[int] = []
        self.length = 0

    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Feed tokens (a chunk or one decode token); return float32 logits of the last one."""
        start, self.length = self.length, self.length + len(token_ids)
        while len(self.table) * self.block_size < self.length:
            self.table.append(self.free.pop())
        meta = AttentionMetadata.build([self.table], [self.length], [len(token_ids)], self.block_size,
                                       self.cache.layers)
        ids = torch.tensor(token_ids)
        positions = torch.arange(start, self.length)
        with set_forward_context(meta):
            hidden = self.model(ids, positions)
        return self.model.compute_logits(hidden[-1:])[0].float()


def greedy(model, config, prompt: list[int], n: int, chunk: int | None = None) -> list[int]:
    seq = SingleSequence(model, config)
    chunk = chunk or len(prompt)
    for i in range(0, len(prompt), chunk):
        logits = seq.step(prompt[i:i + chunk])
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = seq.step([out[-1]])
    return out


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()
