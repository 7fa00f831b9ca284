"""Building a model whose linear layers load straight into a weight format.

The model is built on the meta device; the layers the format quantizes drop their dense weight before any
memory is allocated, their shards are quantized (or taken as they are, for pre-quantized checkpoints) as they
stream in, and each layer is packed for its kernel once all its shards have come. No full-precision copy of
the model is ever held.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from thrifty.errors import InvalidRequestError
from thrifty.models.layers import Linear
from thrifty.models.gguf_native import harmonize
from thrifty.quant.kernels import pack
from thrifty.quant.qtensor import QTensor, quantize_fp8, quantize_int4, quantize_int8
from thrifty.models.weight_spec import WeightSpec


def quantizer_for(spec: WeightSpec) -> Callable[[torch.Tensor], QTensor]:
    """How a float weight becomes a QTensor under this spec (round to nearest)."""
    if spec.kind == "int4":
        return lambda w: quantize_int4(w, spec.group_size)
    if spec.kind == "fp8":
        return quantize_fp8
    if spec.kind in ("int8", "gguf", "dir"):   # gguf / dir: only for float tensors such files may hold
        return quantize_int8
    raise InvalidRequestError(f"weights '{spec.name}' is not a quantized format", "", param="weights")


def quantizable_layers(model: nn.Module) -> dict[str, Linear]:
    """Every Linear, except an output head tied to the embeddings (it shares their dense weight)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, Linear) and not (tied and name == "lm_head")}


def prepare(model: nn.Module, head_apart: bool = False) -> dict[str, Linear]:
    """The layers that load quantized; `head_apart`: the output head loads dense (models/lm_head.py quantizes it
    after loading)."""
    layers = quantizable_layers(model)
    if head_apart:
        layers.pop("lm_head", None)
    for layer in layers.values():
        layer.expect_quantized()
    return layers


def route(weights: Iterable[tuple[str, torch.Tensor | QTensor]], layers: dict[str, Linear],
          quantize: Callable[[torch.Tensor], QTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stage the weights of quantized layers (quantizing float ones); pass everything else on."""
    from thrifty.models.weight_names import fused_name

    for name, tensor in weights:
        target, shard = fused_name(name)
        layer = layers.get(target.removesuffix(".weight")) if target.endswith(".weight") else None
        if layer is None:
            if isinstance(tensor, QTensor):
                tensor = tensor.dequantize()
            yield name, tensor
            continue
        layer.stage(shard, tensor if isinstance(tensor, QTensor) else quantize(tensor.float()))


def finalize(layers: dict[str, Linear], dtype: torch.dtype, device: torch.device) -> None:
    for layer in layers.values():
        layer.finalize(lambda parts: pack(harmonize(parts), dtype, device))


def build_quantized(model_cls, config, weights, dtype: torch.dtype, device: torch.device, spec: WeightSpec,
                    head_apart: bool = False):
    with torch.device("meta"):
        model = model_cls(config)
    layers = prepare(model, head_apart)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.load_weights(route(weights, layers, quantizer_for(spec)))
    finalize(layers, dtype, device)
    return model.eval()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the linear layers' weights (incl. the output head), of the embeddings, and of everything."""
    linear = sum(m.weight_bytes for m in model.modules() if isinstance(m, Linear))
    embed = sum(m.weight.nbytes for m in model.modules() if isinstance(m, nn.Embedding))  # a QuantEmbedding
    # shares the head's table: its bytes count once, with the linear layers
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return {"linear": linear, "embedding": embed, "total": total}


def formats(model: nn.Module) -> dict[str, int]:
    """How many linear layers run in each format."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Linear):
            out[m.weight_format] = out.get(m.weight_format, 0) + 1
    return out
