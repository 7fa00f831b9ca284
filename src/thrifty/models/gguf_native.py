"""GGUF quantized blocks -> QTensor, without requantizing where a kernel can hold the block format.

| GGUF type | block                               | becomes                                   | exact? |
|-----------|-------------------------------------|-------------------------------------------|--------|
| Q8_0      | 32 x int8, fp16 scale               | int8 values, group 32 (two int4 planes)   | yes    |
| Q5_0      | 32 x 5-bit - 16, fp16 scale         | int8 values, group 32 (two int4 planes)   | yes    |
| Q5_1      | 32 x 5-bit, fp16 scale and min      | int8 values + min, group 32               | yes    |
| Q4_0      | 32 x 4-bit - 8, fp16 scale          | int4, group 32                            | yes    |
| Q4_1      | 32 x 4-bit, fp16 scale and min      | int4, group 32                            | yes    |
| Q4_K      | 256: 8 x 32 x 4-bit, 6-bit scale/min | int4, group 32: scale d*sc, min -dmin*m   | yes    |
| Q6_K      | 256: 16 x 16 x 6-bit, int8 scales   | int8 per channel, requantized (see below) | no     |
| others    | (F32, F16, BF16, Q2_K, Q3_K, Q5_K)  | int8 per channel, requantized             | no     |

"Exact" means the integer values and their scales are the file's own; the scales then live in the compute dtype
(float32 keeps them bit-exact, bf16 rounds each scale to 8 significant bits, a relative 0.4 % at most, the
same for the whole group). Q6_K's scales change every 16 values, and no kernel here takes groups under 32, so
Q6_K is dequantized (exactly) and requantized to int8 per channel: 8 bits per value against the file's 6.56, an
error well under the 6-bit step. Q5_0 and Q8_0 cost 1.25 bytes per weight as two int4 planes (the file: 0.69
and 1.06), the price of running them on the int4 kernel without loss.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from thrifty.models.gguf_file import GGUFFile
from thrifty.quant.qtensor import QTensor, quantize_int8

EXACT_TYPES = (T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1, T.Q4_K)


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    rows = raw.shape[0]
    return np.ascontiguousarray(raw).reshape(rows, -1, block_bytes)


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: element j is the low nibble of byte j, element j + 16 its high nibble."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (little-endian uint32) -> the 32 fifth bits."""
    bits = np.ascontiguousarray(qh).view("<u4")[..., 0]
    return ((bits[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _qtensor(values: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, bits: int, group: int) -> QTensor:
    rows = values.shape[0]
    q = torch.from_numpy(np.ascontiguousarray(values).reshape(rows, -1))
    return QTensor(q, torch.from_numpy(scale.astype(np.float32)),
                   None if offset is None else torch.from_numpy(offset.astype(np.float32)), bits, group)


def decode(raw: np.ndarray, qtype: T) -> QTensor | None:
    """Decode a 2-D tensor's stored bytes [rows, bytes per row]; None for types that are not exact here."""
    if qtype == T.Q8_0:
        b = _blocks(raw, 34)
        return _qtensor(b[..., 2:].view(np.int8), _f16(b, 0), None, 8, 32)
    if qtype == T.Q5_0:
        b = _blocks(raw, 22)
        v = (_nibbles(b[..., 6:]) | (_high_bits(b[..., 2:6]) << 4)).astype(np.int8) - np.int8(16)
        return _qtensor(v, _f16(b, 0), None, 8, 32)
    if qtype == T.Q5_1:
        b = _blocks(raw, 24)
        v = (_nibbles(b[..., 8:]) | (_high_bits(b[..., 4:8]) << 4)).astype(np.int8)
        return _qtensor(v, _f16(b, 0), _f16(b, 2), 8, 32)
    if qtype == T.Q4_0:
        b = _blocks(raw, 18)
        d = _f16(b, 0)
        return _qtensor(_nibbles(b[..., 2:]), d, -8 * d, 4, 32)
    if qtype == T.Q4_1:
        b = _blocks(raw, 20)
        return _qtensor(_nibbles(b[..., 4:]), _f16(b, 0), _f16(b, 2), 4, 32)
    if qtype == T.Q4_K:
        return _decode_q4_k(raw)
    return None


def _decode_q4_k(raw: np.ndarray) -> QTensor:
    b = _blocks(raw, 144)                                   # [rows, superblocks, 144]
    rows, nsb = b.shape[:2]
    d, dmin = _f16(b, 0), _f16(b, 2)
    s = b[..., 4:16].astype(np.uint8)                       # 12 bytes: 8 six-bit scales and 8 six-bit mins
    sc = np.empty((rows, nsb, 8), np.uint8)
    mn = np.empty((rows, nsb, 8), np.uint8)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = b[..., 16:].reshape(rows, nsb, 4, 32)              # 4 chunks of 64 values: low nibbles, then high
    q = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, nsb, 8, 32)
    scale = d[..., None] * sc.astype(np.float32)
    offset = -(dmin[..., None] * mn.astype(np.float32))
    return _qtensor(q, scale.reshape(rows, -1), offset.reshape(rows, -1), 4, 32)


def load_tensor(gguf: GGUFFile, name: str) -> QTensor:
    """A 2-D weight of the file as a QTensor: exact where the type allows, else requantized to int8."""
    info = gguf.tensors[name]
    qt = decode(gguf.raw(name), info.qtype) if len(info.shape) == 2 else None
    return qt if qt is not None else quantize_int8(gguf.dequantized(name))


def to_int8_groups(qt: QTensor, group: int) -> QTensor:
    """The same values as 8-bit integers with a scale (and offset) per `group` columns; exact."""
    n, k = qt.shape
    q = qt.q.to(torch.int8) if qt.bits == 4 else qt.q
    rep = qt.group_size // group
    offset = qt.offset if qt.offset is not None else torch.zeros_like(qt.scale)
    return QTensor(q, qt.scale.repeat_interleave(rep, dim=1), offset.repeat_interleave(rep, dim=1), 8, group)


def harmonize(parts: list[QTensor]) -> QTensor:
    """Concatenate the shards of one fused layer; shards of different formats meet as int8 values with the
    smallest group among them (exact: 4-bit values fit 8 bits, per-channel scales repeat per group)."""
    kinds = {(p.bits, p.group_size, p.offset is None, p.kind) for p in parts}
    if len(kinds) == 1:
        return QTensor.cat(parts)
    if any(p.kind != "int" for p in parts):
        return QTensor.cat([quantize_int8(p.dequantize()) for p in parts])
    group = min(p.group_size for p in parts)
    return QTensor.cat([to_int8_groups(p, group) for p in parts])


def _rows_unpermuted(qt: QTensor, heads: int) -> QTensor:
    from thrifty.models.gguf_file import _unpermute_rope

    return QTensor(_unpermute_rope(qt.q, heads), _unpermute_rope(qt.scale, heads),
                   None if qt.offset is None else _unpermute_rope(qt.offset, heads), qt.bits, qt.group_size, qt.kind)


def is_linear_weight(hf: str) -> bool:
    return hf.endswith("_proj.weight") or hf == "lm_head.weight"


def hf_native_weights(gguf: GGUFFile, config) -> Iterator[tuple[str, torch.Tensor | QTensor]]:
    """Like gguf_file.hf_weights, but linear weights come as QTensors in the file's own blocks."""
    from thrifty.models.gguf_file import as_hf_dense, hf_name, rope_heads

    for name, info in gguf.tensors.items():
        target = hf_name(name, config.architecture)
        if target is None:
            continue
        if is_linear_weight(target) and len(info.shape) == 2:
            qt = load_tensor(gguf, name)
            heads = rope_heads(name, config)
            yield target, _rows_unpermuted(qt, heads) if heads else qt
        else:
            yield target, as_hf_dense(name, gguf.dequantized(name), config)
