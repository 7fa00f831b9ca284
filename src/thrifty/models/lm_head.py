"""The `lm_head=` option: the output head (and, where it is tied, the embedding table) in int8.

    auto    with quantized linear weights (int8 / int4 / fp8 / gguf / a quantized folder): an untied head takes
            their format (as the layers do), a tied one int8 on a CPU; with dense weights, dense
    dense   the head keeps a dense weight in the compute dtype (a tied one shares the embeddings' table)
    int8    symmetric int8: groups of 32 values with a float16 scale each (llama.cpp's Q8_0) on thrifty's native
            kernel (bf16 compute on a CPU), one scale per row on torch's int8 kernel otherwise

The head is the biggest single weight of a small model (Gemma 3 270M: 262,144 x 640, 335 MB in bf16, more than
all its other weights) and every decode step reads all of it. A tied head keeps ONE int8 table: the head
multiplies with it and the embedding lookup dequantizes only the rows it looks up, so the model's memory falls by
the dense table too (models/quantized_head.py). The zoo's Qwen2.5 GGUFs carry their own output head (untied), which
int4 weights already put in int4-g32 (81 MiB on the 0.5B); `int8` there trades bytes read per step for quality
(README, "The output head"). This module imports no torch: the CLI's flags and the config read it.
"""
from __future__ import annotations

from thrifty.errors import InvalidRequestError

LM_HEADS = ("auto", "dense", "int8")
FLAG_HELP = ("output head (and the embeddings it is tied to): auto (with quantized --weights, an untied head in "
             "their format, a tied one int8 on a CPU), dense, int8 (groups of 32 with a scale each, as llama.cpp's "
             "Q8_0)")


def check_lm_head(value: str) -> str:
    """The option's value, lower-cased; a clear error for anything else."""
    low = str(value).strip().lower()
    if low not in LM_HEADS:
        raise InvalidRequestError(f"unknown lm_head '{value}'", f"use one of {', '.join(LM_HEADS)}", param="lm_head")
    return low


def resolve_lm_head(value: str, weights_quantized: bool, tied: bool, device: "torch.device") -> str:  # noqa: F821
    """'dense', 'int8', or 'weights' (an untied head in the linear layers' format) for this load. auto on a tied
    head: int8 when the linear weights are quantized and the model runs on a CPU (on CUDA torch's int8 weight
    dequantizes the whole table per call)."""
    low = check_lm_head(value)
    if low != "auto":
        return low
    if not weights_quantized:
        return "dense"
    if not tied:
        return "weights"
    return "int8" if device.type == "cpu" else "dense"
