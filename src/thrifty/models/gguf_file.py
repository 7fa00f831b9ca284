"""GGUF files: metadata, tensor directory, and dequantized tensors.

The header and metadata are parsed here with `struct` over a memory map (gguf's own reader builds a Python
object per array element and takes ~7 s on a 150k-token vocabulary; this takes well under a second).
Tensor types, block sizes and dequantization come from the `gguf` package, so every type it knows works.
Every read is bounds-checked, so a truncated or corrupt file fails with a ModelFileError naming the cause.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from thrifty.errors import ModelFileError, UnsupportedModelError
from thrifty.models.config import ModelConfig

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_ARCHITECTURES = ("qwen2", "llama", "gemma3")

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(slots=True, frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]        # torch order: rows first (GGUF stores the fastest dimension first)
    qtype: GGMLQuantizationType
    offset: int                   # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """A bounds-checked little-endian reader over a buffer."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _truncated(self.path, f"header ends at byte {len(self.buf)}")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if n > len(self.buf) - self.pos:
            raise _corrupt(self.path, f"a string of {n} bytes at byte {self.pos}")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.take("I"), self.take("Q")
            if item_type in _SCALAR_FORMATS:  # one vectorised read for numeric arrays
                dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise _truncated(self.path, "inside a metadata array")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos = end
                return arr.tolist()
            return [self.value(item_type) for _ in range(count)]
        raise _corrupt(self.path, f"unknown metadata value type {vtype} at byte {self.pos}")


def _truncated(path: Path, detail: str) -> ModelFileError:
    return ModelFileError(f"{path} is truncated ({detail})",
                          "download or assemble it again (for a zoo model: thrifty models pull NAME --force)")


def _corrupt(path: Path, detail: str) -> ModelFileError:
    return ModelFileError(f"{path} is not a valid GGUF file ({detail})",
                          "download or assemble it again (for a zoo model: thrifty models pull NAME --force)")


# llama.cpp's llama_ftype codes for the types a user meets most (general.file_type).
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 12: "Q3_K_M",
               14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


class GGUFFile:
    """An open GGUF file: `metadata`, `tensors` (the directory), and tensor data on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file {self.path} does not exist",
                                 "check the path, or use a zoo name (thrifty models list)")
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 24:
                raise _truncated(self.path, f"only {size} bytes")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse(memoryview(self._map))

    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf, self.path)
        if bytes(buf[:4]) != MAGIC:
            raise _corrupt(self.path, "bad magic bytes")
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{self.path} is GGUF version {version}; thrifty reads versions 2 and 3",
                                        "convert it with a current llama.cpp")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise _corrupt(self.path, f"{n_tensors} tensors and {n_kv} metadata keys")
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("I"))
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _corrupt(self.path, f"general.alignment is {alignment!r}, not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        for name, shape, qtype, rel in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = math.prod(shape)  # exact: np.prod wraps around on corrupt huge dimensions
            if n % block:
                raise _corrupt(self.path, f"tensor {name} has {n} values, not a multiple of {block}")
            info = TensorInfo(name, shape, qtype, data_start + rel, n // block * type_size)
            if info.offset + info.nbytes > len(buf):
                raise _truncated(self.path, f"tensor {name} ends past the end of the file")
            self.tensors[name] = info

    def _tensor_info(self, cur: _Cursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > 8:
            raise _corrupt(self.path, f"tensor {name} has {n_dims} dimensions")
        dims = [cur.take("Q") for _ in range(n_dims)]
        raw_type = cur.take("I")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedModelError(f"tensor {name} in {self.path} has unknown type {raw_type}",
                                        "upgrade the gguf package or re-quantize the model") from None
        return name, tuple(reversed(dims)), qtype, cur.take("Q")

    # ---- tensor data -------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, shaped (rows..., bytes per row)."""
        info = self.tensors[name]
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], -1)

    def dequantized(self, name: str) -> torch.Tensor:
        """The tensor as float32, whatever its stored type."""
        info = self.tensors[name]
        values = np.ascontiguousarray(dequantize(self.raw(name), info.qtype), dtype=np.float32)
        if not values.flags.writeable:  # F32 tensors come back as views of the read-only map
            values = values.copy()
        return torch.from_numpy(values.reshape(info.shape))

    def iter_dequantized(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.dequantized(name)

    # ---- architecture ------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def file_type_name(self) -> str:
        """llama.cpp's name for the file's type (`general.file_type`): what the file calls itself."""
        code = self.metadata.get("general.file_type")
        return _FILE_TYPES.get(code, f"file type {code}")

    def model_config(self) -> ModelConfig:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path.name} is a '{arch or 'unknown'}' model; thrifty runs {', '.join(SUPPORTED_ARCHITECTURES)}",
                "use a Qwen2, Llama-family or Gemma 3 GGUF")
        m = self.metadata

        def key(name: str, default: Any = None) -> Any:
            value = m.get(f"{arch}.{name}", default)
            if value is None:
                raise _corrupt(self.path, f"metadata key {arch}.{name} is missing")
            return value

        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise _corrupt(self.path, "tensor token_embd.weight is missing")
        return ModelConfig(
            architecture=arch,
            num_layers=int(key("block_count")),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("attention.key_length", hidden // heads)),
            vocab_size=embed.shape[0],
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(key("context_length", 4096)),
            tie_word_embeddings="output.weight" not in self.tensors,
            attention_bias="blk.0.attn_q.bias" in self.tensors,
            sliding_window=m.get(f"{arch}.attention.sliding_window"),
            name=str(m.get("general.name", self.path.stem)),
            **(self._gemma3_config(hidden, heads) if arch == "gemma3" else {}),
        )

    def _gemma3_config(self, hidden: int, heads: int) -> dict[str, Any]:
        """What llama.cpp takes as given for Gemma 3 where the file does not say: every 6th layer global, local
        RoPE base 10,000, queries scaled by head_dim^-1/2 (as transformers' query_pre_attn_scalar for 270M-12B)."""
        m = self.metadata
        return {
            "sliding_window_pattern": int(m.get("gemma3.attention.sliding_window_pattern", 6)),
            "rope_local_theta": float(m.get("gemma3.rope.freq_base_swa", 10000.0)),
            "query_pre_attn_scalar": float(m.get("gemma3.attention.key_length", hidden // heads)),
            "final_logit_softcapping": m.get("gemma3.final_logit_softcapping"),
        }

    def close(self) -> None:
        self._map.close()


# ---- GGUF tensor names -> Hugging Face names ---------------------------------------------------------
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
# Gemma 3 has four norms per layer: its ffn_norm is the one before the MLP
_GEMMA3_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm"}


def hf_name(name: str, architecture: str = "qwen2") -> str | None:
    """'blk.3.attn_q.bias' -> 'model.layers.3.self_attn.q_proj.bias'; None for tensors models do not use."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer_names = _GEMMA3_LAYER_NAMES if architecture == "gemma3" else _LAYER_NAMES
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    return None


def rope_heads(name: str, config: ModelConfig) -> int | None:
    """Heads whose rows llama.cpp's converter permuted in this tensor (Llama q and k), else None."""
    if config.architecture == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
        return config.num_heads
    if config.architecture == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
        return config.num_kv_heads
    return None


def as_hf_dense(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A dense tensor of the file in Hugging Face's convention: Llama q/k rows unpermuted; Gemma's norms, which
    llama.cpp's converter stores as 1 + weight, back to weight (the model adds the 1 in float32, as HF does)."""
    heads = rope_heads(name, config)
    if heads:
        return _unpermute_rope(tensor, heads)
    if config.architecture == "gemma3" and name.endswith("norm.weight"):
        return tensor - 1.0
    return tensor


def _unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves the rotary halves of Llama q/k rows; undo it (Qwen2 files are not permuted)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_weights(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the file, dequantized to float32, under its Hugging Face name."""
    for name in gguf.tensors:
        target = hf_name(name, config.architecture)
        if target is not None:
            yield target, as_hf_dense(name, gguf.dequantized(name), config)
