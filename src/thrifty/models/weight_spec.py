"""The `weights=` option: which format a model's linear layers run in.

    auto        dense, in the compute dtype (the default)
    bf16, fp32  dense, in that dtype (sets the compute dtype when dtype is auto)
    int8        int8, one scale per output channel, round-to-nearest from the float weights
    int4        int4, asymmetric, groups of 32 (int4-g64 / int4-g128 / int4-g256 pick another group)
    fp8         float8 e4m3 storage, one scale per row, upcast for the matmul
    gguf        a .gguf model's own quantized blocks, repacked without requantizing where a kernel holds them
    DIR         a folder written by `thrifty quantize` (its config says the format)

The output head (and the embedding table where it is tied) is the `lm_head=` option's (thrifty.models.lm_head):
auto quantizes an untied head with the layers and puts a tied one in int8 when these weights are quantized, on a
CPU; otherwise it stays dense in the compute dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from thrifty.errors import InvalidRequestError
from thrifty.quant.qtensor import DEFAULT_INT4_GROUP, INT4_GROUP_SIZES

NAMES = ("auto", "bf16", "fp32", "int8", "int4", "int4-g32", "int4-g64", "int4-g128", "int4-g256", "fp8", "gguf")


@dataclass(slots=True, frozen=True)
class WeightSpec:
    kind: str                        # "dense", "int8", "int4", "fp8", "gguf", "dir"
    dense_dtype: str | None = None   # "bf16" / "fp32" for dense, None for auto
    group_size: int | None = None    # int4
    path: Path | None = None         # dir

    @property
    def quantized(self) -> bool:
        return self.kind != "dense"

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return self.dense_dtype or "auto"
        if self.kind == "int4":
            return f"int4-g{self.group_size}"
        return str(self.path) if self.kind == "dir" else self.kind


def parse_weights(value: str | Path | WeightSpec | None) -> WeightSpec:
    if isinstance(value, WeightSpec):
        return value
    if value is None:
        return WeightSpec("dense")
    text = str(value).strip()
    low = text.lower()
    if low in ("auto", ""):
        return WeightSpec("dense")
    if low in ("bf16", "bfloat16"):
        return WeightSpec("dense", "bf16")
    if low in ("fp32", "float32"):
        return WeightSpec("dense", "fp32")
    if low in ("int8", "fp8", "gguf"):
        return WeightSpec(low)
    m = re.fullmatch(r"int4(?:-g(\d+))?", low)
    if m:
        group = int(m.group(1)) if m.group(1) else DEFAULT_INT4_GROUP
        if group not in INT4_GROUP_SIZES:
            raise InvalidRequestError(f"unsupported int4 group size {group} in weights='{text}'",
                                      f"use one of {', '.join(map(str, INT4_GROUP_SIZES))}", param="weights")
        return WeightSpec("int4", group_size=group)
    path = Path(text).expanduser()
    if path.is_dir():
        return WeightSpec("dir", path=path)
    raise InvalidRequestError(f"unknown weights format '{text}'",
                              f"use one of {', '.join(NAMES)}, or a folder written by `thrifty quantize`",
                              param="weights")


def _shape_signature(config) -> tuple:
    return (config.architecture, config.num_layers, config.hidden_size, config.intermediate_size,
            config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size)


def resolve_weights(path: Path, weights: str | Path | WeightSpec | None, dtype):
    """(checkpoint path, WeightSpec, dtype) for loading the model at `path` with `weights`.

    A quantized folder given as the model means weights=that folder; a folder given as weights must hold
    the same architecture and shapes as the model; gguf needs a .gguf model; bf16 / fp32 set the compute dtype
    when it is auto and may not contradict an explicit one.
    """
    from thrifty.errors import ModelFileError
    from thrifty.models import quantized_checkpoint as checkpoint

    spec = parse_weights(weights)
    path = Path(path)
    if checkpoint.is_quantized_folder(path):
        if spec.kind != "dense" or spec.dense_dtype is not None:
            if spec.kind == "dir" and spec.path.resolve() == path.resolve():
                return path, spec, dtype
            raise InvalidRequestError(f"{path} is already quantized; weights='{spec.name}' cannot apply to it",
                                      "leave weights at auto for a quantized folder", param="weights")
        return path, WeightSpec("dir", path=path), dtype
    if spec.kind == "dir":
        if not checkpoint.is_quantized_folder(spec.path):
            raise InvalidRequestError(f"{spec.path} is no folder written by `thrifty quantize` (no quantization_config"
                                      " in its config.json)", "run thrifty quantize --out DIR first", param="weights")
        from thrifty.models.loader import read_config

        theirs, ours = checkpoint.read_config(spec.path), read_config(path)
        if _shape_signature(theirs) != _shape_signature(ours):
            raise ModelFileError(f"the quantized folder {spec.path} does not fit the model {path.name}: shapes "
                                 f"{_shape_signature(theirs)} vs {_shape_signature(ours)}",
                                 "quantize this model, or load the folder with --model DIR")
        return spec.path, spec, dtype
    if spec.kind == "gguf" and not (path.is_file() and path.suffix == ".gguf"):
        raise InvalidRequestError(f"weights='gguf' needs a .gguf model; {path} is not one",
                                  "use int8 or int4 for other checkpoints", param="weights")
    if spec.dense_dtype is not None:
        wanted = {"bf16": ("bf16", "bfloat16"), "fp32": ("fp32", "float32")}[spec.dense_dtype]
        if dtype == "auto":
            dtype = wanted[1]
        elif str(dtype).removeprefix("torch.") not in wanted:
            raise InvalidRequestError(f"weights='{spec.dense_dtype}' contradicts dtype='{dtype}'",
                                      "drop one of them", param="weights")
    return path, spec, dtype
