"""thrifty's own CPU kernels (csrc/): the few-token int4 / int8 matmul and the fused ops of a decode step.

A batch-1 decode step on a CPU is two costs: streaming every weight once (torch's int4 / int8 kernels reach
~7 / ~13 GB/s on two Zen 3 cores, a fifth to a third of the bandwidth), and ~2,000 small torch ops of a few
microseconds each (norms, rotary, attention over the paged cache, activations). The kernels here attack both:

- `qgemv`: x W^T for up to ~32 rows with 4- or 8-bit group-quantized weights. The activations are quantized
  to int8 per 32 values (as llama.cpp does), so it serves bf16 compute; float32 compute keeps exact kernels.
  Its inner loop is AVX2 `maddubs`, or AVX512-VNNI `vpdpbusd` where the CPU has it (THRIFTY_QGEMV).
- `rms_norm`, `add_rms_norm_`, `rope_`, `act_mul`: one call each for what takes 2-10 torch ops.
- `decode_attention`, `kv_write_`: paged attention for one-token queries straight from the KV blocks, float or
  int8 / fp8 with per-row scales (ops/kv_quant.py), dequantized in registers.
The torch code each one replaces stays beside its call site as the reference and the fallback.

They are compiled on first use with torch's C++ extension tooling (g++ and ninja, ~30 s) into
$THRIFTY_HOME/kernels/, keyed by the sources' hash and the torch version, and loaded from there afterwards.
Where they cannot be built or run (no AVX2 / FMA / F16C, no compiler, THRIFTY_NATIVE_KERNELS=0), `available()`
is False and torch's ops run instead; the reason is logged once.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("thrifty.kernels")

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("qgemv.cpp", "fused.cpp", "attention.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None once they are built and loaded."""
    return _load()


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    if os.environ.get("THRIFTY_NATIVE_KERNELS", "1") == "0":
        return "THRIFTY_NATIVE_KERNELS=0"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    from thrifty.paths import home

    paths = [CSRC / s for s in SOURCES]
    headers = sorted(CSRC.glob("*.h"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*paths, *headers])
                            + " ".join(FLAGS).encode()).hexdigest()[:16]
    build = home() / "kernels" / f"thrifty-{digest}-torch{torch.__version__.replace('+', '-')}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()

        if not (build / "thrifty_kernels.so").exists():
            log.warning("building thrifty's CPU kernels into %s: about half a minute, once", build)
        cpp_extension.load("thrifty_kernels", [str(p) for p in paths], extra_cflags=FLAGS,
                           extra_include_paths=[str(CSRC)], build_directory=str(build), is_python_module=False,
                           verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: torch's ops stay in use
        log.warning("thrifty's CPU kernels could not be built (%s); using torch's ops", e)
        return f"build failed: {e}"
    return None


def _put_ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the pip package's binary sits beside this interpreter's
    scripts, which PATH lacks when the venv's python runs without activating the venv."""
    import shutil

    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def available() -> bool:
    return _load() is None


_DTYPES = (torch.float32, torch.bfloat16)
_KV_DTYPES = (*_DTYPES, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


def runs(t: torch.Tensor) -> bool:
    """True when the fused ops take this tensor: a float32 or bf16 CPU tensor, the kernels built."""
    return t.dtype in _DTYPES and t.is_cpu and _load() is None


def runs_kv(cache: torch.Tensor) -> bool:
    """True when decode_attention and kv_write_ take this KV cache tensor (float, or int8 / fp8 with scales)."""
    return cache.dtype in _KV_DTYPES and cache.is_cpu and _load() is None


# ---- few-token matmul ------------------------------------------------------------------------------------
# qgemv's inner loop: AVX512-VNNI vpdpbusd where the CPU has it (auto), or one of the two forced; both multiply
# the same int8 x exactly and differ only in the float summation order of the chunk products.
QGEMV_PATHS = {"auto": -1, "avx2": 1, "vnni": 2}


@functools.lru_cache(maxsize=None)
def qgemv_path() -> int:
    """THRIFTY_QGEMV=auto|avx2|vnni (default auto) as the kernel's path argument; read once per process."""
    name = os.environ.get("THRIFTY_QGEMV", "auto")
    if name not in QGEMV_PATHS:
        raise ValueError(f"THRIFTY_QGEMV={name!r}: use one of {', '.join(QGEMV_PATHS)}")
    return QGEMV_PATHS[name]


def qgemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
          bias: torch.Tensor | None, bits: int, group: int, path: str | None = None) -> torch.Tensor:
    """x [M, K] float32 / bf16 -> x W^T + bias [M, N] in x's dtype; path: a key of QGEMV_PATHS (None:
    THRIFTY_QGEMV)."""
    mode = qgemv_path() if path is None else QGEMV_PATHS[path]
    return torch.ops.thrifty.qgemv(x.contiguous(), packed, scales, mins, bias, bits, group, mode)


def qdequant(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int,
             group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight qgemv multiplies with (scale * q + min per group), float32 or bf16 (rounded from the
    float32 values, written directly)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"qdequant writes float32 or bfloat16, not {dtype}")
    return torch.ops.thrifty.qdequant(packed, scales, mins, bits, group, dtype == torch.bfloat16)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K/2]: per 64 values, byte j = q[j] | q[j + 32] << 4."""
    n, k = q.shape
    v = q.to(torch.uint8).reshape(n, k // 64, 2, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4."""
    n, half = packed.shape
    v = packed.reshape(n, half // 32, 32)
    return torch.stack((v & 15, v >> 4), dim=2).reshape(n, half * 2)


def supports(k: int, group: int) -> bool:
    """Shapes qgemv takes: K a multiple of 64, groups of 32 values or more dividing K."""
    return k % 64 == 0 and group % 32 == 0 and k % group == 0


# ---- fused decoder-layer ops (references: thrifty.models.layers) -----------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return torch.ops.thrifty.rms_norm(x, weight, eps, offset)


def add_rms_norm_(h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  offset: float = 0.0) -> torch.Tensor:
    """residual += h in place, then rms_norm(residual): a decoder layer's residual add and next norm, one call."""
    return torch.ops.thrifty.add_rms_norm_(h, residual, weight, eps, offset)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Neox rotary on q [T, H, D] and k [T, Hkv, D] in place; cos / sin [T, 1, D] or [T, D]."""
    torch.ops.thrifty.rope_(q, k, cos, sin)


def act_mul(gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """silu(gate) * up (gelu_tanh with gelu=True) for gate | up stacked on the last dim."""
    return torch.ops.thrifty.act_mul(gate_up, gelu)


# ---- paged attention (reference: thrifty.ops.attention) ------------------------------------------------
# How an int8 KV cache is read (csrc/int8_dot.h): the integer dot for K with the query rounded to two int8 terms
# per head, on AVX512-VNNI (auto, the default, where the CPU has it; the float kernel elsewhere), its portable
# twin forced, or the float kernel. The 0.5B, 2 Zen 4 cores, batch 8: decode 1.43x bf16 KV at 8k context,
# 1.05x at 512 (results/2026-12-05-epyc-zen4-2core-kv); the float kernel is the slow, obvious path tests compare to.
INT8_DOT = {"auto": -1, "float": 0, "portable": 1, "vnni": 2}


def int8_dot_mode() -> int:
    """THRIFTY_KV_INT8_DOT=auto|float|portable|vnni (default auto) as the kernel's int8_dot argument."""
    name = os.environ.get("THRIFTY_KV_INT8_DOT", "auto")
    if name not in INT8_DOT:
        raise ValueError(f"THRIFTY_KV_INT8_DOT={name!r}: use one of {', '.join(INT8_DOT)}")
    return INT8_DOT[name]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     k_channel: torch.Tensor | None = None, int8_dot: str | None = None) -> torch.Tensor:
    """k_scale / v_scale: the bfloat16 per-row scales of an int8 / fp8 cache (None for a float cache);
    k_channel: K's float32 per-channel divisor [Hkv, D] (ops/kv_quant.py), or None; int8_dot: a key of INT8_DOT
    (None: THRIFTY_KV_INT8_DOT)."""
    mode = int8_dot_mode() if int8_dot is None else INT8_DOT[int8_dot]
    return torch.ops.thrifty.decode_attention(q.contiguous(), k_cache, v_cache, block_tables, context_lens, scale,
                                              window or 0, k_scale, v_scale, k_channel, mode)


def has_vnni() -> bool:
    """The CPU has what the VNNI integer dot needs (AVX512F / BW / VL / VNNI)."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _cpu_flags()


def kv_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
              k_channel: torch.Tensor | None = None, k_shift: torch.Tensor | None = None) -> None:
    """Writes k, v [T, Hkv, D] at slots; into an int8 / fp8 cache quantized per row (K as (k - k_shift) /
    k_channel), scales into k/v_scale."""
    torch.ops.thrifty.kv_write_(k_cache, v_cache, k, v, slots, k_scale, v_scale, k_channel, k_shift)
