"""Model spec (zoo name, .gguf file, HF folder) -> config, torch module with weights, tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from thrifty.errors import InvalidRequestError
from thrifty.models import hf_folder
from thrifty.models.config import ModelConfig
from thrifty.models.gguf_file import GGUFFile, hf_weights
from thrifty.models.qwen2 import Qwen2ForCausalLM

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    model: Qwen2ForCausalLM
    config: ModelConfig
    tokenizer: "Tokenizer"  # noqa: F821 (imported lazily)
    path: Path
    dtype: torch.dtype
    device: torch.device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bf16: fast matmuls on both this CPU (avx512_bf16) and GPUs; fp16 is unusable on CPU (FACTS.md)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype '{dtype}'", f"use one of auto, {', '.join(DTYPES)}", param="dtype")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_checkpoint(path: Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], "Tokenizer"]:  # noqa: F821
    """Config, a lazy iterator of HF-named float32 weights, and the tokenizer of a local model path."""
    from thrifty.models.tokenizer import Tokenizer

    if hf_folder.is_hf_folder(path):
        return hf_folder.read_config(path), hf_folder.weights(path), Tokenizer.from_hf_folder(path)
    gguf = GGUFFile(path)
    config = gguf.model_config()
    return config, hf_weights(gguf, config), Tokenizer.from_gguf(gguf)


def build_model(config: ModelConfig, weights: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device: torch.device) -> Qwen2ForCausalLM:
    # Build on the meta device so no throw-away float32 copy of every weight is allocated.
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.load_weights(weights)
    return model.eval()


def load(spec: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> LoadedModel:
    from thrifty.models import zoo

    path = zoo.resolve(str(spec))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config, weights, tokenizer = read_checkpoint(path)
    model = build_model(config, weights, torch_dtype, dev)
    return LoadedModel(model, config, tokenizer, path, torch_dtype, dev)
