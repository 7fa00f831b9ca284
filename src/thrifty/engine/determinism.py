"""`deterministic: true`: the same request gives the same tokens whatever else is in the batch.

What makes a row's result depend on its batch, and what this mode does about it:
- matmuls whose reduction order changes with the number of rows. float32 GEMMs on x86 do (a one-row call is a
  GEMV), bf16 linear layers here do not: `check` measures that on this machine at start and refuses the mode
  where it fails, and quantized kernels switch algorithms at a row count (thrifty.quant.kernels), so the mode
  wants dense bf16 weights;
- attention: a prompt prefilled whole (SDPA), in chunks (SDPA over a gathered prefix) or beside decodes takes
  different kernels. In this mode every query row runs the native decode kernel over its own context, whatever
  chunk it came in (ops/attention.py), so chunking and batching no longer change a row's numbers;
- sampling: per-request seeded generators (already batch-invariant).
"""
from __future__ import annotations

import torch

from thrifty import native
from thrifty.errors import InvalidRequestError

_PROBE_ROWS = (1, 2, 3, 8, 17, 64, 65)


def check(dtype: torch.dtype, weights: str) -> None:
    """Raise when deterministic mode cannot hold for this model setup on this machine."""
    if dtype != torch.bfloat16:
        raise InvalidRequestError(f"deterministic mode needs bf16 compute, not {dtype}",
                                  "use dtype auto or bfloat16: float32 matmuls on CPUs split rows by batch size",
                                  param="deterministic")
    if weights not in ("auto", "bf16"):
        raise InvalidRequestError(f"deterministic mode needs dense bf16 weights, not {weights}",
                                  "use weights auto or bf16: quantized kernels change algorithm with the row count",
                                  param="deterministic")
    if not native.available():
        raise InvalidRequestError(f"deterministic mode needs thrifty's native kernels ({native.unavailable_reason()})",
                                  "install a C++ compiler (g++) or leave deterministic off", param="deterministic")
    if not linear_rows_invariant(dtype):
        raise InvalidRequestError("this machine's bf16 matmul gives a row different results in batches of "
                                  "different sizes", "leave deterministic off here", param="deterministic")


def linear_rows_invariant(dtype: torch.dtype, k: int = 256, n: int = 384) -> bool:
    """Does row 0 of x @ W^T come out bit-identical whatever the number of rows? (a few ms)"""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(max(_PROBE_ROWS), k, generator=gen).to(dtype)
    first = torch.nn.functional.linear(x[:1], w)
    return all(torch.equal(torch.nn.functional.linear(x[:m], w)[:1], first) for m in _PROBE_ROWS[1:])
