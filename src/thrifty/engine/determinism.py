"""`deterministic: true`: the same request gives the same tokens whatever else is in the batch.

What makes a row's result depend on its batch, and what this mode does about it:
- matmuls whose reduction order changes with the number of rows. float32 GEMMs on x86 do at many row counts;
  bf16 ones on a CPU with AVX512-BF16 do only between one row (a matrix-vector kernel that splits a long
  reduction, e.g. the 4864-wide down projection) and two or more. The mode runs every one-row linear layer as
  two rows (`pin_row_kernels`: a zero row, dropped after), and `check` measures at start, with that padding and
  the reduction lengths of real layers, that a row then comes out bit-identical at any row count, refusing the
  mode where it does not. Quantized kernels switch algorithms at a row count (thrifty.quant.kernels), so the
  mode wants dense bf16 weights;
- attention: a prompt prefilled whole (SDPA), in chunks (SDPA over a gathered prefix) or beside decodes takes
  different kernels. In this mode every query row runs the native decode kernel over its own context, whatever
  chunk it came in (ops/attention.py), so chunking and batching no longer change a row's numbers;
- sampling: per-request seeded generators (already batch-invariant).
"""
from __future__ import annotations

import torch

from thrifty import native
from thrifty.models.layers import Linear
from thrifty.ops import precision
from thrifty.errors import InvalidRequestError

_PROBE_ROWS = (1, 2, 3, 8, 17, 64, 65)
_PROBE_SHAPES = ((256, 384), (4864, 128))   # (in, out): a short reduction and a long one like a down projection
MIN_ROWS = 2                                 # one-row linear calls run as two (see the module's docstring)


def pin_row_kernels(model: torch.nn.Module) -> None:
    """Run the model's dense linear layers with at least MIN_ROWS rows. It stays set on the model: another
    engine sharing it gets the same numbers (two or more rows are untouched) and pays a zero row on one-row
    calls."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.min_rows = MIN_ROWS


def check(dtype: torch.dtype, weights: str, lm_head: str = "dense") -> None:
    """Raise when deterministic mode cannot hold for this model setup on this machine."""
    if dtype != torch.bfloat16:
        raise InvalidRequestError(f"deterministic mode needs bf16 compute, not {dtype}",
                                  "use dtype auto or bfloat16: float32 matmuls on CPUs split rows by batch size",
                                  param="deterministic")
    if weights not in ("auto", "bf16"):
        raise InvalidRequestError(f"deterministic mode needs dense bf16 weights, not {weights}",
                                  "use weights auto or bf16: quantized kernels change algorithm with the row count",
                                  param="deterministic")
    if lm_head == "int8":
        raise InvalidRequestError(f"deterministic mode needs a dense output head, not {lm_head}",
                                  "use lm_head auto or dense: the int8 head's kernel changes algorithm with the "
                                  "row count", param="deterministic")
    if not native.available():
        raise InvalidRequestError(f"deterministic mode needs thrifty's native kernels ({native.unavailable_reason()})",
                                  "install a C++ compiler (g++) or leave deterministic off", param="deterministic")
    if not linear_rows_invariant(dtype):
        raise InvalidRequestError("this machine's bf16 matmul gives a row different results in batches of "
                                  "different sizes", "leave deterministic off here", param="deterministic")


def linear_rows_invariant(dtype: torch.dtype) -> bool:
    """Does each probed row of x @ W^T come out bit-identical whatever the number of rows, one-row calls padded
    as the mode pads them? (tens of ms)"""
    gen = torch.Generator().manual_seed(0)
    for k, n in _PROBE_SHAPES:
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(max(_PROBE_ROWS), k, generator=gen).to(dtype)
        alone = [precision.linear(x[r:r + 1], w, min_rows=MIN_ROWS) for r in range(8)]
        for m in _PROBE_ROWS[1:]:
            out = precision.linear(x[:m], w, min_rows=MIN_ROWS)
            if not all(torch.equal(out[r:r + 1], alone[r]) for r in range(min(m, len(alone)))):
                return False
    return True
