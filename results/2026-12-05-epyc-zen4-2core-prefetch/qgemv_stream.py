"""qgemv M=1 over 28 layers of the 1.5B's int4 shapes in model order (819 MB: DRAM-streamed), GB/s per shape.
Usage: PYTHONPATH=src python qgemv_stream.py [auto|vnni|avx2]"""
import statistics, sys, time, torch
from thrifty import native
torch.set_num_threads(2); assert native.available(), native.unavailable_reason()
SH = [("qkv", 2048, 1536), ("o", 1536, 1536), ("gate_up", 17920, 1536), ("down", 1536, 8960)]
G = 32
g = torch.Generator().manual_seed(0)
layers = []
for l in range(28):
    mats = []
    for name, n, k in SH:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        mats.append((name, native.pack_int4(q), (torch.rand(n, k // G, generator=g) * 0.02).half(),
                     (torch.randn(n, k // G, generator=g) * 0.1).half(), n, k))
    layers.append(mats)
xs = {k: torch.randn(1, k, generator=g).bfloat16() for _, _, k in SH}
path = sys.argv[1] if len(sys.argv) > 1 else "auto"
per = {name: [] for name, *_ in SH}
tot = []
for rep in range(6):
    t0 = time.perf_counter()
    for mats in layers:
        for name, w, s, mn, n, k in mats:
            t = time.perf_counter()
            native.qgemv(xs[k], w, s, mn, None, 4, G, path=path)
            per[name].append(time.perf_counter() - t)
    tot.append(time.perf_counter() - t0)
nbytes = {name: n * k // 2 + 2 * 2 * n * k // G for name, n, k in SH}
total = sum(nbytes.values()) * 28
buf = torch.ones(2**28 // 4 * 4, dtype=torch.float32)
ts = []
for _ in range(5):
    t = time.perf_counter(); buf.sum(); ts.append(time.perf_counter() - t)
print(f"torch sum bandwidth {buf.nbytes / min(ts) / 1e9:.1f} GB/s (best of 5)")
print(f"28 layers: median {statistics.median(tot[1:]) * 1e3:.1f} ms, {total / 1e6:.0f} MB -> {total / statistics.median(tot[1:]) / 1e9:.1f} GB/s")
for name, *_ in SH:
    med = statistics.median(per[name][28:])
    print(f"  {name:8} {med * 1e3:.3f} ms  {nbytes[name] / med / 1e9:.1f} GB/s")
