"""`thrifty bench step`: where a decode step's time goes, at each batch size, beside its physical floors.

For each batch size B, B sequences of `context` random prompt tokens are prefilled, then `steps` pure decode
steps (every sequence one token) are timed through `LLMEngine.step` exactly as it serves, split into the
phases of `engine.last_step_timing` (schedule / inputs / forward / logits / sampling / postprocess). A few more
steps run under torch's profiler: the self time of every op (aten and thrifty kernels) is the step's op time;
the rest of the step is Python, dispatch and the engine's bookkeeping. On CUDA the profiler's device time is
the kernel time and its kernel count the launches per step.

The floors: the bytes a step must read (the linear weights and output head once, one embedding row per
sequence, every sequence's KV context) over the memory bandwidth measured in the same run, and the step's
multiply-adds over the float32 GEMM rate measured in the same run. Decode is bandwidth-bound at batch 1 and
compute-bound where many sequences share the weight read.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from thrifty.bench.stats import hardware_info, now_iso
from thrifty.bench.workload import random_requests, token_high
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.engine.step_timing import PHASES
from thrifty.errors import InvalidRequestError


@dataclass(slots=True)
class StepConfig:
    model: str
    batch: list[int] = field(default_factory=lambda: [1, 8, 32])
    context: int = 128            # prompt tokens per sequence before the timed steps
    steps: int = 24               # timed decode steps per batch size
    profile_steps: int = 6        # further steps under the profiler (op / kernel time)
    weights: str = "auto"
    lm_head: str = "auto"                  # the output head's format (thrifty.models.lm_head)
    dtype: str = "auto"
    device: str | None = None
    threads: int | None = None
    block_size: int = 16
    seed: int = 0
    enforce_eager: bool = False            # CUDA: eager decode steps instead of replayed CUDA graphs
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.batch or min(self.batch) < 1:
            raise InvalidRequestError("batch sizes must be >= 1", "e.g. --batch 1,8,32", param="batch")
        if self.context < 1 or self.steps < 1 or self.profile_steps < 0:
            raise InvalidRequestError("--context and --steps must be >= 1", "", param="steps")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int = 5, pick=statistics.median) -> float:
    """Seconds of one call of fn (after one warm call): the median of `repeats`, or another `pick` of them."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return pick(times)


def measure_bandwidth(device: torch.device, gib: float = 0.5) -> float:
    """Read bandwidth in bytes/s: one pass of `sum` over a buffer far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    return x.nbytes / _time(x.sum, device)


def measure_gemm_rate(device: torch.device, n: int = 2048) -> float:
    """float32 multiply-adds per second of an n x n x n GEMM, the best of a few: a practical compute ceiling
    for large batches (not a hard one: int8 dot products can beat it on some CPUs)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return n ** 3 / _time(lambda: a @ b, device, pick=min)


def _model_counts(loaded) -> dict[str, int]:
    """Bytes a decode step reads once whatever the batch, and the multiply-adds of one token."""
    from thrifty.models.layers import Linear
    from thrifty.models.quantized import weight_bytes

    wb = weight_bytes(loaded.model)
    macs = sum(m.in_features * m.out_features for m in loaded.model.modules() if isinstance(m, Linear))
    return {"linear_bytes": wb["linear"], "macs_per_token": macs}


def _kv_bytes_per_token(engine: LLMEngine) -> int:
    spec = engine.kv_cache.spec
    return spec.bytes_per_block // spec.block_size


def _decode_engine(loaded, cfg: StepConfig, batch: int) -> LLMEngine:
    """An engine holding `batch` sequences that have finished their prefill and decode from here on."""
    # a margin of output tokens: sequences prefilled in a later step than others decode a few tokens behind
    total = cfg.context + cfg.steps + cfg.profile_steps + 16
    blocks = batch * (-(-total // cfg.block_size) + 2)        # room to spare: a preemption would spoil the timing
    engine = LLMEngine(loaded, EngineConfig(
        dtype=cfg.dtype, device=cfg.device, num_kv_blocks=blocks, block_size=cfg.block_size, max_num_seqs=batch,
        max_num_batched_tokens=max(2048, cfg.context), enable_prefix_caching=False, weights=cfg.weights,
        lm_head=cfg.lm_head, enforce_eager=cfg.enforce_eager))
    high = token_high(min(loaded.config.vocab_size, loaded.tokenizer.vocab_size), loaded.tokenizer.stop_token_ids)
    params = SamplingParams(max_tokens=total - cfg.context, temperature=0.0, ignore_eos=True)
    for i, req in enumerate(random_requests(batch, cfg.context, 1, high, cfg.seed)):
        engine.add_request(req.prompt_ids, params, f"step-{i}")
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    for _ in range(2):                        # warm: first decode calls allocate and pick kernels
        engine.step()
    return engine


def _decode_step(engine: LLMEngine) -> None:
    before = engine.stats.tokens_computed
    engine.step()
    ran = engine.stats.tokens_computed - before
    if ran != len(engine.scheduler.running):
        raise RuntimeError(f"a timed step ran {ran} tokens for {len(engine.scheduler.running)} sequences: "
                           "not a pure decode step")


def _profile(engine: LLMEngine, steps: int, device: torch.device) -> dict:
    """Per step under torch's profiler: wall time, op time (CPU self time of every aten / thrifty op), ops run,
    and on CUDA the kernels' device time and launches. The profiler's own cost per op (~1-2 us) lands in the
    wall time, so `outside kernels` is an upper bound."""
    from torch.profiler import ProfilerActivity, profile

    empty = {"profiled_step_ms": None, "op_ms": None, "ops": None, "kernel_ms": None, "launches": None}
    if steps == 0:
        return empty
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            _decode_step(engine)
        _sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    cpu = [e for e in events if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA]
    out = {"profiled_step_ms": wall * 1e3 / steps, "op_ms": sum(e.self_cpu_time_total for e in cpu) / 1e3 / steps,
           "ops": sum(e.count for e in cpu) / steps, "launches": None}
    if device.type != "cuda":
        return out | {"kernel_ms": out["op_ms"]}
    cuda = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    return out | {"kernel_ms": sum(e.self_device_time_total for e in cuda) / 1e3 / steps,
                  "launches": sum(e.count for e in cuda) / steps}


def bench_batch(loaded, cfg: StepConfig, batch: int, counts: dict, bandwidth: float, gemm_rate: float) -> dict:
    engine = _decode_engine(loaded, cfg, batch)
    walls, phases = [], {p: [] for p in PHASES}
    for _ in tqdm(range(cfg.steps), desc=f"batch {batch}", unit="step", disable=not cfg.progress, leave=False):
        start = time.perf_counter()
        _decode_step(engine)
        _sync(loaded.device)
        walls.append(time.perf_counter() - start)
        for p, v in engine.last_step_timing.as_dict().items():
            phases[p].append(v)
    prof = _profile(engine, cfg.profile_steps, loaded.device)
    contexts = [s.num_computed_tokens for s in engine.scheduler.running]
    graphs = engine.runner.graphs
    engine.abort_all()
    step_ms = statistics.median(walls) * 1e3
    read = counts["linear_bytes"] + batch * loaded.config.hidden_size * loaded.dtype.itemsize \
        + sum(contexts) * _kv_bytes_per_token(engine)
    floor_bw_ms = read / bandwidth * 1e3
    floor_compute_ms = batch * counts["macs_per_token"] / gemm_rate * 1e3
    kernel, profiled = prof["kernel_ms"], prof["profiled_step_ms"]
    return {
        "batch": batch, "step_ms": step_ms, "tokens_per_s": batch / step_ms * 1e3,
        **{f"{p}_ms": statistics.median(v) * 1e3 for p, v in phases.items()},
        "profiled_step_ms": profiled, "op_ms": prof["op_ms"], "ops_per_step": prof["ops"], "kernel_ms": kernel,
        "outside_kernels_ms": profiled - kernel if kernel is not None else None,
        "launches_per_step": prof["launches"],
        "cuda_graphs": None if graphs is None else graphs.state,
        "bytes_read": read, "floor_bandwidth_ms": floor_bw_ms, "floor_compute_ms": floor_compute_ms,
        "floor_ms": max(floor_bw_ms, floor_compute_ms),
        "step_over_floor": step_ms / max(floor_bw_ms, floor_compute_ms),
    }


def run_step(cfg: StepConfig) -> dict:
    from thrifty.models.loader import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log(f"loading {cfg.model} (weights {cfg.weights}) ...")
    loaded = load(cfg.model, cfg.dtype, cfg.device, weights=cfg.weights, lm_head=cfg.lm_head)
    counts = _model_counts(loaded)
    bandwidth = measure_bandwidth(loaded.device)
    gemm_rate = measure_gemm_rate(loaded.device)
    log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 GEMM {gemm_rate / 1e9:.1f} GMAC/s")
    rows = []
    for b in cfg.batch:
        row = bench_batch(loaded, cfg, b, counts, bandwidth, gemm_rate)
        log(f"batch {b}: {row['step_ms']:.2f} ms a step ({row['tokens_per_s']:.1f} tok/s), floor "
            f"{row['floor_ms']:.2f} ms")
        rows.append(row)
    model_info = {"spec": cfg.model, "name": loaded.config.name, "weights": cfg.weights, "lm_head": loaded.lm_head,
                  "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device),
                  "linear_bytes": counts["linear_bytes"], "macs_per_token": counts["macs_per_token"]}
    return {"benchmark": "step", "date": now_iso(), "model": model_info, "hardware": hardware_info(),
            "measured": {"read_bandwidth_gb_s": bandwidth / 1e9, "fp32_gemm_gmac_s": gemm_rate / 1e9},
            "config": asdict(cfg), "results": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> list[dict]:
    """What one more decoding sequence adds to a step, from the smallest batch to each larger one."""
    if len(rows) < 2:
        return []
    base = min(rows, key=lambda r: r["batch"])
    return [{"name": f"ms per extra sequence, batch {base['batch']} -> {r['batch']}",
             "value": (r["step_ms"] - base["step_ms"]) / (r["batch"] - base["batch"]),
             "floor": (r["floor_ms"] - base["floor_ms"]) / (r["batch"] - base["batch"])}
            for r in rows if r["batch"] > base["batch"]]


def format_report(report: dict) -> str:
    from thrifty.bench.report import markdown_table

    m, hw = report["model"], report["hardware"]
    lines = [f"## decode step: {m['name']} weights={m['weights']} lm_head={m.get('lm_head', '-')} ({m['dtype']}, {m['device']}) on {hw['cpu']}, "
             f"{hw['torch_threads']} threads",
             f"measured: read bandwidth {report['measured']['read_bandwidth_gb_s']:.1f} GB/s, float32 GEMM "
             f"{report['measured']['fp32_gemm_gmac_s']:.1f} GMAC/s; linear weights "
             f"{m['linear_bytes'] / 2**20:.1f} MiB, {m['macs_per_token'] / 1e6:.0f} M multiply-adds a token", ""]
    headers = ["batch", "step ms", "tok/s", *PHASES, "profiled step ms", "kernels ms", "outside kernels ms",
               "ops / step", "floor ms (bw / compute)", "step / floor"]
    rows = [[r["batch"], r["step_ms"], r["tokens_per_s"], *[r[f"{p}_ms"] for p in PHASES], r["profiled_step_ms"],
             r["kernel_ms"], r["outside_kernels_ms"], r["ops_per_step"],
             f"{r['floor_bandwidth_ms']:.2f} / {r['floor_compute_ms']:.2f}", r["step_over_floor"]]
            for r in report["results"]]
    lines.append(markdown_table(headers, rows))
    if any(r["launches_per_step"] is not None for r in report["results"]):
        lines.append("")
        lines.append(markdown_table(["batch", "launches / step", "CUDA graphs"],
                                    [[r["batch"], r["launches_per_step"], r.get("cuda_graphs") or "eager"]
                                     for r in report["results"]]))
    if report["ratios"]:
        lines.append("")
        lines.append(markdown_table(["ratio", "measured ms", "floor ms"],
                                    [[r["name"], r["value"], r["floor"]] for r in report["ratios"]]))
    lines.append("")
    lines.append("step ms and the phases: median of the timed steps. profiled step: the mean wall time of the "
                 "steps run under the profiler; kernels: its self time of every op they ran (on CUDA: device "
                 "time); outside kernels: the difference (Python, dispatch, bookkeeping, and the profiler's own "
                 "cost: an upper bound). Floors: bytes read / measured bandwidth, and multiply-adds / measured "
                 "float32 GEMM rate.")
    return "\n".join(lines)
