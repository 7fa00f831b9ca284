"""How Hugging Face weight names map onto the model's fused layers (q|k|v -> qkv_proj, gate|up -> gate_up_proj):
the model (qwen2.py) loads by it, and so does code outside the model that loads, quantizes or exports weights by
name."""
from __future__ import annotations

import re

_FUSED = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
_SHARDS = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}


def fused_name(name: str) -> tuple[str, str | None]:
    """'model.layers.0.self_attn.k_proj.bias' -> ('model.layers.0.self_attn.qkv_proj.bias', 'k'); an unfused
    weight's name comes back with None."""
    m = _FUSED.match(name)
    if not m:
        return name, None
    fused, shard = _SHARDS[m.group(2)]
    return f"{m.group(1)}.{fused}.{m.group(3)}", shard


def unfused_names() -> dict[tuple[str, str], str]:
    """(fused layer, shard) -> the Hugging Face projection it came from, e.g. ('qkv_proj', 'k') -> 'k_proj'."""
    return {(fused, shard): orig for orig, (fused, shard) in _SHARDS.items()}
