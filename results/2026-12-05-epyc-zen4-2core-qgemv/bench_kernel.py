"""qgemv alone: the AVX2 path vs the AVX512-VNNI path vs torch's bf16 GEMM of the dense weight (F.linear), for the
0.5B's shapes and the two int8 heads, random weights; median ms of several calls. Usage: bench_kernel.py OUT.json"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from thrifty import native

SHAPES = [  # name, N, K, bits
    ("qkv 896->1152 int4", 1152, 896, 4),
    ("o 896->896 int4", 896, 896, 4),
    ("gate_up 896->9728 int4", 9728, 896, 4),
    ("down 4864->896 int4", 896, 4864, 4),
    ("head 151936x896 int4", 151936, 896, 4),
    ("head 151936x896 int8", 151936, 896, 8),
    ("gemma head 262144x640 int8", 262144, 640, 8),
]
ROWS = (1, 2, 4, 8, 16, 32)
GROUP = 32


def median_ms(fns: dict, calls: int) -> dict[str, float]:
    """Median ms of each function, the calls interleaved (a, b, c, a, b, c, ...) so drift in a shared machine's
    speed hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(calls):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(out: str) -> None:
    assert native.available(), native.unavailable_reason()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'shape':28} {'M':>3} {'avx2 ms':>9} {'vnni ms':>9} {'bf16 ms':>9} {'avx2/vnni':>9} {'bf16/vnni':>9}")
    for name, n, k, bits in SHAPES:
        q = (torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g) if bits == 4
             else torch.randint(-127, 128, (n, k), dtype=torch.int16, generator=g).to(torch.int8))
        packed = native.pack_int4(q) if bits == 4 else q
        scales = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.001).half()
        mins = (torch.randn(n, k // GROUP, generator=g) * 0.1).half() if bits == 4 else None
        dense = native.qdequant(packed, scales, mins, bits, GROUP).to(torch.bfloat16)
        del q
        calls = 7 if n > 100_000 else 31
        for m in ROWS:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            r = {"shape": name, "n": n, "k": k, "bits": bits, "m": m}
            r |= median_ms({
                "avx2": lambda: native.qgemv(x, packed, scales, mins, None, bits, GROUP, path="avx2"),
                "vnni": lambda: native.qgemv(x, packed, scales, mins, None, bits, GROUP, path="vnni"),
                "bf16": lambda: torch.nn.functional.linear(x, dense)}, calls)
            rows.append(r)
            print(f"{name:28} {m:3d} {r['avx2']:9.3f} {r['vnni']:9.3f} {r['bf16']:9.3f} "
                  f"{r['avx2'] / r['vnni']:9.2f} {r['bf16'] / r['vnni']:9.2f}", flush=True)
        del dense, packed
    with open(out, "w") as f:
        json.dump({"processor": "AMD EPYC Zen 4, 2 cores", "torch": torch.__version__, "threads": 2, "group": GROUP,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
