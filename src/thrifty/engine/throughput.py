"""What this machine computes per second on a loaded engine: the input to a local tier's `auto` price.

A short probe (8 prompts of 128 tokens prefilled together, then 8 sequences decoding 32 tokens together,
at most 8 s of it) on the engine the server will use, run PROBES times: the median prices tokens, and the
range says how much the machine's load moved it (a busy machine prices tokens high: delete the stored file
to measure again). The result is kept as JSON under $THRIFTY_HOME/throughput/, keyed by what sets the speed
(the model's identity: path, size, mtime; weight format, dtype, device, torch's thread count), not by the
engine's other options, so the next start on the same machine reuses it.
"""
from __future__ import annotations

import hashlib
import json
import time
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from thrifty import paths

PROBE_SEQS = 8
PROBE_PREFILL = 128
PROBE_DECODE = 32
DECODE_BUDGET_S = 8.0                        # a slow machine measures fewer decode steps, not for longer
PROBES = 3


@dataclass(slots=True)
class Throughput:
    prefill_tokens_per_s: float              # the median of the probes
    decode_tokens_per_s: float
    measured_at: float                       # Unix time
    seconds: float                           # how long the probes took
    prefill_range: list[float] = field(default_factory=list)   # [min, max] over the probes
    decode_range: list[float] = field(default_factory=list)
    probes: int = 1


def probe_key(engine: Any) -> str:
    """What sets the speed: model identity, weights, dtype, device, torch threads (not the KV cache size or the
    batch limits, which a probe of 8 sequences does not reach)."""
    import torch

    path = Path(engine.loaded.path)
    try:
        st = path.stat()
        identity = [str(path.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        identity = [str(path)]
    data = {"model": identity, "weights": engine.loaded.weights, "dtype": str(engine.loaded.dtype),
            "device": str(getattr(engine.loaded, "device", "cpu")), "threads": torch.get_num_threads()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


def measure_median(engine: Any, probes: int = PROBES) -> Throughput:
    """`probes` probes: the median of each rate, and its range."""
    start = time.perf_counter()
    runs = [measure(engine) for _ in range(probes)]
    prefill = [r.prefill_tokens_per_s for r in runs]
    decode = [r.decode_tokens_per_s for r in runs]
    return Throughput(statistics.median(prefill), statistics.median(decode), time.time(),
                      time.perf_counter() - start, [min(prefill), max(prefill)], [min(decode), max(decode)], probes)


def measure(engine: Any, seqs: int = PROBE_SEQS, prefill: int = PROBE_PREFILL, decode: int = PROBE_DECODE,
            decode_budget_s: float = DECODE_BUDGET_S) -> Throughput:
    """Prefill and decode tokens/s of `engine` (an LLMEngine) at a batch of `seqs`. The decode part stops
    after `decode_budget_s` when a slow machine has not finished its `decode` steps by then."""
    from thrifty.engine.sampling import SamplingParams

    start = time.perf_counter()
    vocab = engine.loaded.config.vocab_size
    prefill = max(1, min(prefill, engine.max_model_len - decode - 2))
    # distinct prompts, so the prefix cache cannot skip any of the work
    prompts = [[(17 + 7919 * (i * prefill + j)) % vocab for j in range(prefill)] for i in range(seqs)]
    t0 = time.perf_counter()
    engine.run(prompts, [SamplingParams(max_tokens=1, temperature=0.0) for _ in prompts])
    prefill_s = time.perf_counter() - t0
    for i in range(seqs):
        engine.add_request([(29 + 104729 * (i + 1) + j) % vocab for j in range(4)],
                           SamplingParams(max_tokens=decode + 1, temperature=0.0, ignore_eos=True))
    engine.step()  # the 4-token prefills and each sequence's first token: not decode
    tokens, t0 = 0, time.perf_counter()
    while engine.has_unfinished() and time.perf_counter() - t0 < decode_budget_s:
        tokens += sum(len(o.delta_token_ids) for o in engine.step())
    decode_s = time.perf_counter() - t0
    engine.abort_all()
    return Throughput(seqs * prefill / prefill_s, max(tokens, 1) / decode_s, time.time(),
                      time.perf_counter() - start)


def measured_throughput(engine: Any, home: Path | None = None) -> tuple[Throughput, bool]:
    """(throughput, reused): the stored measurement for this setup, or new probes (then stored)."""
    folder = (home or paths.home()) / "throughput"
    path = folder / f"{probe_key(engine)}.json"
    try:
        return Throughput(**json.loads(path.read_text())), True
    except (OSError, ValueError, TypeError):
        pass
    result = measure_median(engine)
    engine.reset_stats()  # the probe is not traffic: its blocks and counters would mislead the metrics
    with paths.atomic_write(path, "w") as f:
        f.write(json.dumps(asdict(result), indent=2) + "\n")
    return result, False
