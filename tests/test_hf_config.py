"""Hugging Face config.json variants: RoPE's base wherever the writing transformers version put it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from thrifty.models.hf_folder import read_config

BASE = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


@pytest.mark.parametrize("extra,theta", [
    ({"rope_theta": 1000000.0}, 1e6),                                                    # transformers 4
    ({"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}, 1e6),       # transformers 5
    ({"rope_scaling": {"rope_theta": 500000.0, "rope_type": "default"}}, 5e5),
    ({}, 10000.0),                                                                       # the default
], ids=["top-level", "rope_parameters", "rope_scaling", "absent"])
def test_rope_theta_is_read_where_transformers_wrote_it(tmp_path: Path, extra: dict, theta: float) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **extra}))
    assert read_config(tmp_path).rope_theta == theta
