import torch, time
from thrifty import native
from thrifty.engine.kv_cache import KVCacheSpec, PagedKVCache
torch.manual_seed(0)
B, H, HKV, D, CTX, BS = 8, 14, 2, 64, 8192, 16
nb = CTX // BS
res = {}
for dt in (torch.bfloat16, torch.int8):
    spec = KVCacheSpec(1, HKV, D, BS, B * nb, dt)
    layer = PagedKVCache(spec).layers[0]
    tables = torch.arange(B * nb).reshape(B, nb)
    for s in range(B):
        slots = (tables[s, :, None] * BS + torch.arange(BS)).flatten()
        layer.write(torch.randn(CTX, HKV, D), torch.randn(CTX, HKV, D), slots)
    lens = torch.full((B,), CTX)
    q = torch.randn(B, H, D)
    modes = ["float"] if dt == torch.bfloat16 else ["float", "portable", "vnni"]
    for m in modes:
        f = lambda: native.decode_attention(q, layer.k, layer.v, tables, lens, 0.125, None, layer.k_scale, layer.v_scale, layer.k_channel, int8_dot=m)
        f()
        ts = []
        for _ in range(7):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        ts.sort(); res[(str(dt), m)] = ts[3]
        print(dt, m, f"{ts[3]*1e3:.2f} ms per layer call (median of 7)")
