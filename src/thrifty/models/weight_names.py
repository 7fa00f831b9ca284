"""How Hugging Face weight names map onto the model's fused layers (q|k|v -> qkv_proj, gate|up -> gate_up_proj),
for code outside the model that loads, quantizes or exports weights by name. The model (qwen2.py) owns the
layout; this is its public face."""
from __future__ import annotations

from thrifty.models import qwen2


def fused_name(name: str) -> tuple[str, str | None]:
    """'model.layers.0.self_attn.k_proj.bias' -> ('model.layers.0.self_attn.qkv_proj.bias', 'k'); an unfused
    weight's name comes back with None."""
    return qwen2._fused_name(name)


def unfused_names() -> dict[tuple[str, str], str]:
    """(fused layer, shard) -> the Hugging Face projection it came from, e.g. ('qkv_proj', 'k') -> 'k_proj'."""
    return {(fused, shard): orig for orig, (fused, shard) in qwen2._SHARDS.items()}
