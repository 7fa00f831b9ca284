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
    path = folder / "config.json"
    raw = _json_object(path)
    arch_names = raw.get("architectures") or []
    if not isinstance(arch_names, list):
        raise ModelFileError(f"{path}: architectures must be a list of names", "check the model folder")
    arch = next((ARCHITECTURES[a] for a in arch_names if isinstance(a, str) and a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{folder.name} is a {', '.join(map(str, arch_names)) or 'model of unknown architecture'}; "
            f"thrifty runs {', '.join(ARCHITECTURES)}", "use a Qwen2 or Llama-family model")
    size = _Sizes(raw, path)
    heads = size.count("num_attention_heads")
    hidden = size.count("hidden_size")
    kv_heads = size.count("num_key_value_heads", heads)
    head_dim = size.count("head_dim", hidden // heads if hidden % heads == 0 else None)
    if heads % kv_heads:
        raise ModelFileError(f"{path}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                             f"({kv_heads})", "check the model folder")
    config = ModelConfig(
        architecture=arch,
        num_layers=size.count("num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=size.count("intermediate_size"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=size.count("vocab_size"),
        rope_theta=size.positive(rope_theta(raw), "rope_theta"),
        rms_norm_eps=size.positive(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        max_position_embeddings=size.count("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        sliding_window=None,
        name=str(raw.get("_name_or_path") or folder.name),
    )
    _check_against_weights(config, folder, path)
    return config


def _json_object(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"cannot read {path}: {e}", "check the model folder") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} holds a JSON {type(raw).__name__}, not an object", "check the model folder")
    return raw


class _Sizes:
    """Reads config.json's sizes, each a positive integer (or a positive number), naming the key when not."""

    LIMIT = 1 << 24  # larger than any real size; a corrupted one must not become a huge allocation

    def __init__(self, raw: dict, path: Path) -> None:
        self.raw, self.path = raw, path

    def count(self, key: str, default: int | None = None) -> int:
        value = self.raw.get(key)
        value = default if value is None else value  # null reads as absent
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= self.LIMIT:
            raise ModelFileError(f"{self.path}: {key} must be a positive integer, got {value!r}",
                                 "check the model folder")
        return value

    def positive(self, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ModelFileError(f"{self.path}: {key} must be a positive number, got {value!r}",
                                 "check the model folder")
        return float(value)


def _check_against_weights(config: ModelConfig, folder: Path, path: Path) -> None:
    """The embedding's shape in the weights must match the config, before anything is allocated from it."""
    for file in sorted(folder.glob("*.safetensors")):
        with _open(file) as f:
            if "model.embed_tokens.weight" in f.keys():
                shape = tuple(f.get_slice("model.embed_tokens.weight").get_shape())
                if shape != (config.vocab_size, config.hidden_size):
                    raise ModelFileError(f"{path} says vocab_size x hidden_size = {config.vocab_size} x "
                                         f"{config.hidden_size}, but {file.name} holds an embedding of {shape}",
                                         "use the config.json that came with these weights")
                return


def _open(file: Path):
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # safetensors raises its own error types, and OSError / ValueError on bad headers
        raise ModelFileError(f"cannot read {file}: {e}", "the file is damaged or incomplete: download it again") from None


def rope_theta(raw: dict) -> object:
    """RoPE's base as written: top-level in configs written before transformers 5, only under `rope_parameters`
    after (`rope_scaling` held it in some 4.x releases)."""
    for section in (raw, raw.get("rope_parameters"), raw.get("rope_scaling")):
        if isinstance(section, dict) and section.get("rope_theta") is not None:
            return section["rope_theta"]
    return 10000.0


def weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"no *.safetensors files in {folder}", "point --model at a folder with weights")
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:  # a data range past the end of a truncated file, an unknown dtype
                    raise ModelFileError(f"cannot read tensor {name} from {file}: {e}",
                                         "the file is damaged or incomplete: download it again") from None
                yield name, tensor.float()
