"""Hugging Face model folders: config.json + *.safetensors (+ tokenizer.json)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from thrifty.errors import ModelFileError, UnsupportedModelError
from thrifty.models.config import ModelConfig

# HF `architectures` entry -> our architecture name
ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(folder: Path) -> ModelConfig:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"cannot read {folder / 'config.json'}: {e}", "check the model folder") from None
    arch_names = raw.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in arch_names if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{folder.name} is a {', '.join(arch_names) or 'model of unknown architecture'}; "
            f"thrifty runs {', '.join(ARCHITECTURES)}", "use a Qwen2 or Llama-family model")
    heads = raw["num_attention_heads"]
    return ModelConfig(
        architecture=arch,
        num_layers=raw["num_hidden_layers"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        vocab_size=raw["vocab_size"],
        rope_theta=rope_theta(raw),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        sliding_window=None,
        name=raw.get("_name_or_path") or folder.name,
    )


def rope_theta(raw: dict) -> float:
    """RoPE's base: top-level in configs written before transformers 5, only under `rope_parameters` after
    (`rope_scaling` held it in some 4.x releases)."""
    for section in (raw, raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}):
        if section.get("rope_theta") is not None:
            return float(section["rope_theta"])
    return 10000.0


def weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"no *.safetensors files in {folder}", "point --model at a folder with weights")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float()
