"""The int8 output head and, where it is tied, the one int8 table that also serves the embedding lookup
(the `lm_head=int8` option, models/lm_head.py)."""
from __future__ import annotations

import torch
from torch import nn

from thrifty.quant.kernels import NativeWeight, QuantWeight, pack
from thrifty.quant.qtensor import QTensor, quantize_int8

GROUP = 32  # values per scale on the native kernel: llama.cpp's Q8_0


def head_qtensor(weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> QTensor:
    """The head's weight in int8: Q8_0-like groups where the native kernel takes them, one scale per row else."""
    grouped = quantize_int8(weight, GROUP) if weight.shape[1] % GROUP == 0 else None
    if grouped is None or not NativeWeight.takes(grouped, dtype, device):
        return quantize_int8(weight)
    # round against the float16 scale the kernel keeps, so each weight is off by at most half its step
    scale = grouped.scale.half().float().clamp(min=2.0 ** -24)
    n, k = weight.shape
    q = torch.round(weight.float().view(n, k // GROUP, GROUP) / scale[:, :, None]).clamp_(-127, 127)
    return QTensor(q.to(torch.int8).view(n, k), scale, None, 8, GROUP)


class QuantEmbedding(nn.Module):
    """An embedding lookup in the head's int8 table: the looked-up rows, dequantized to the compute dtype."""

    def __init__(self, table: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table     # the same module as lm_head.qweight: one copy of the bytes
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.table.gather_rows(flat, self.dtype).view(*ids.shape, self.embedding_dim)


def quantize_head(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Put a loaded model's output head in int8; a tied one's embedding lookup then reads the same table."""
    head = model.lm_head
    tied = model.config.tie_word_embeddings
    weight = model.model.embed_tokens.weight if tied else head.weight
    packed = pack(head_qtensor(weight.detach(), dtype, device), dtype, device)
    head.set_quantized(packed)
    if tied:
        model.model.embed_tokens = QuantEmbedding(packed, dtype)
