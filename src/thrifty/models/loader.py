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
from thrifty.models.causal_lm import CausalLM
from thrifty.models.registry import model_class

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: "Tokenizer"  # noqa: F821 (imported lazily)
    path: Path
    dtype: torch.dtype
    device: torch.device
    weights: str = "auto"       # the weight format the linear layers run in (thrifty.models.weight_spec)
    lm_head: str = "dense"      # the output head's format, resolved: dense, int8 or weights (thrifty.models.lm_head)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bf16: half the bytes of float32 for weights, activations and KV; where a CPU has no bf16 math,
    GEMMs upcast to float32 (thrifty.ops.precision). fp16 is unusable on CPU."""
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


def read_checkpoint(path: Path, native: bool = False
                    ) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], "Tokenizer"]:  # noqa: F821
    """Config, a lazy iterator of HF-named float32 weights, and the tokenizer of a local model path.

    A folder written by `thrifty quantize`, and a GGUF file read with `native=True`, yield their linear
    weights as QTensors (thrifty.quant.qtensor) instead.
    """
    from thrifty.models.tokenizer import Tokenizer
    from thrifty.models import quantized_checkpoint as checkpoint

    if checkpoint.is_quantized_folder(path):
        return checkpoint.read(path)
    if hf_folder.is_hf_folder(path):
        return hf_folder.read_config(path), hf_folder.weights(path), Tokenizer.from_hf_folder(path)
    gguf = GGUFFile(path)
    config = gguf.model_config()
    if native:
        from thrifty.models.gguf_native import hf_native_weights

        return config, hf_native_weights(gguf, config), Tokenizer.from_gguf(gguf)
    return config, hf_weights(gguf, config), Tokenizer.from_gguf(gguf)


def build_model(config: ModelConfig, weights: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
                device: torch.device, spec: "WeightSpec | None" = None,  # noqa: F821
                lm_head: str = "dense") -> CausalLM:
    """`lm_head` (resolved): weights, an untied head quantized with the linear layers; dense or int8, the head
    loads dense (a quantized checkpoint's head dequantized) and, for int8, is quantized once the weights are in."""
    if spec is not None and spec.quantized:
        from thrifty.models.quantized import build_quantized

        model = build_quantized(model_class(config), config, weights, dtype, device, spec,
                                head_apart=lm_head != "weights")
    else:
        # Build on the meta device so no throw-away float32 copy of every weight is allocated.
        with torch.device("meta"):
            model = model_class(config)(config)
        model = model.to(dtype=dtype).to_empty(device=device)
        model.load_weights(weights)
    if lm_head == "int8":
        from thrifty.models.quantized_head import quantize_head

        quantize_head(model, dtype, device)
    return model.eval()


def load(spec: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None,
         weights: str = "auto", lm_head: str = "auto") -> LoadedModel:
    """`weights`: auto, bf16, fp32, int8, int4[-gG], fp8, gguf, or a folder from `thrifty quantize`
    (thrifty.models.weight_spec). `lm_head`: auto, dense or int8 (thrifty.models.lm_head)."""
    from thrifty.models import zoo
    from thrifty.models.lm_head import check_lm_head, resolve_lm_head
    from thrifty.models.weight_spec import resolve_weights

    check_lm_head(lm_head)
    path = zoo.resolve(str(spec))
    dev = resolve_device(device)
    path, wspec, dtype = resolve_weights(path, weights, dtype)
    torch_dtype = resolve_dtype(dtype, dev)
    config, tensors, tokenizer = read_checkpoint(path, native=wspec.kind == "gguf")
    head = resolve_lm_head(lm_head, wspec.quantized, config.tie_word_embeddings, dev)
    model = build_model(config, tensors, torch_dtype, dev, wspec, head)
    return LoadedModel(model, config, tokenizer, path, torch_dtype, dev, wspec.name, head)


def read_config(path: Path) -> ModelConfig:
    """A local model's config alone (no weights read)."""
    from thrifty.models import quantized_checkpoint as checkpoint

    if checkpoint.is_quantized_folder(path):
        return checkpoint.read_config(path)
    if hf_folder.is_hf_folder(path):
        return hf_folder.read_config(path)
    return GGUFFile(path).model_config()
