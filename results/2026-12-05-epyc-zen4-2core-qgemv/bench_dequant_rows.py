"""Where qgemv stops beating the dequantize + GEMM path (NativeWeight._dense: qdequant, then one GEMM in the dtype
precision picks) with each inner loop: the 0.5B's int4 layer shapes, bf16 x, M = 32 .. 256; median ms, calls
interleaved. Usage: bench_dequant_rows.py OUT.json"""
from __future__ import annotations

import json
import sys

import torch

from bench_kernel import GROUP, SHAPES, median_ms
from thrifty import native
from thrifty.quant import kernels

ROWS = (32, 48, 64, 96, 128, 192, 256)


def main(out: str) -> None:
    assert native.available(), native.unavailable_reason()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'shape':24} {'M':>4} {'avx2 ms':>9} {'vnni ms':>9} {'dequant+GEMM ms':>16}")
    for name, n, k, bits in SHAPES[:4]:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        packed = native.pack_int4(q)
        scales = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.001).half()
        mins = (torch.randn(n, k // GROUP, generator=g) * 0.1).half()
        weight = kernels.NativeWeight.__new__(kernels.NativeWeight)
        torch.nn.Module.__init__(weight)
        weight.out_features, weight.in_features, weight.bits, weight.group_size = n, k, bits, GROUP
        weight.packed, weight.scales, weight.mins = packed, scales, mins
        for m in ROWS:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            r = {"shape": name, "n": n, "k": k, "m": m} | median_ms({
                "avx2": lambda: native.qgemv(x, packed, scales, mins, None, bits, GROUP, path="avx2"),
                "vnni": lambda: native.qgemv(x, packed, scales, mins, None, bits, GROUP, path="vnni"),
                "dense": lambda: weight._dense(x)}, 15)
            rows.append(r)
            print(f"{name:24} {m:4d} {r['avx2']:9.3f} {r['vnni']:9.3f} {r['dense']:16.3f}", flush=True)
    with open(out, "w") as f:
        json.dump({"processor": "AMD EPYC Zen 4, 2 cores", "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
