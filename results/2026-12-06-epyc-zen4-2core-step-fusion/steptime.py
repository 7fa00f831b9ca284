import statistics, sys, time, torch
from thrifty.bench.step import StepConfig, _decode_engine, _decode_step
from thrifty.models.loader import load
torch.set_num_threads(2)
cfg = StepConfig("qwen2.5-coder-0.5b-instruct", weights="int4", batch=[1], steps=200)
loaded = load(cfg.model, weights="int4")
eng = _decode_engine(loaded, cfg, 1)
for _ in range(5): _decode_step(eng)
ts = []
for _ in range(150):
    a = time.perf_counter(); _decode_step(eng); ts.append((time.perf_counter() - a) * 1e3)
ts.sort()
print(sys.argv[1], f"min {ts[0]:.2f} p10 {ts[15]:.2f} median {statistics.median(ts):.2f}")
