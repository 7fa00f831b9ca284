"""`thrifty bench determinism`: do requests give the same tokens alone and in a batch, with `deterministic` off
and on, and what does the mode cost?

Per mode, one engine around the same model: each of `requests` chat prompts (HumanEval through the chat template;
half greedy, half seeded sampling at temperature 0.8) runs alone, then all run together as one batch. Reported:
how many batched outputs differ from the same request alone, and the batch's output tokens/s.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from thrifty.bench.stats import hardware_info, now_iso
from thrifty.engine.sampling import SamplingParams


@dataclass(slots=True)
class DeterminismConfig:
    model: str
    requests: int = 32
    max_tokens: int = 64
    dtype: str = "auto"
    threads: int | None = None
    progress: bool = True


def run_determinism(cfg: DeterminismConfig) -> dict:
    from thrifty.bench.engine_run import make_engine
    from thrifty.bench.humaneval import load_problems
    from thrifty.models.loader import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"loading {cfg.model} ...", file=sys.stderr, flush=True)
    loaded = load(cfg.model, cfg.dtype)
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(p.messages()), add_special_tokens=False)
               for p in load_problems(0, cfg.requests - 1)]
    params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(max_tokens=cfg.max_tokens, temperature=0.8, seed=1000 + i, ignore_eos=True)
              for i in range(len(prompts))]
    results = []
    for deterministic in (False, True):
        options = dict(dtype=cfg.dtype, deterministic=deterministic, max_num_seqs=len(prompts), kv_cache_memory=1.0)
        alone = [make_engine(loaded, **options).run([p], [sp])[0].token_ids
                 for p, sp in tqdm(list(zip(prompts, params)), desc=f"alone (deterministic={deterministic})",
                                   unit="req", disable=not cfg.progress, leave=False)]
        engine = make_engine(loaded, **options)
        start = time.perf_counter()
        batched = [out.token_ids for out in engine.run(prompts, params)]
        seconds = time.perf_counter() - start
        differ = [i for i, (a, b) in enumerate(zip(alone, batched)) if a != b]
        results.append({"deterministic": deterministic, "requests": len(prompts), "differ": len(differ),
                        "differ_greedy": sum(1 for i in differ if i % 2 == 0),
                        "differ_seeded": sum(1 for i in differ if i % 2 == 1), "differing_requests": differ,
                        "batch_seconds": seconds, "batch_output_tok_s": sum(map(len, batched)) / seconds})
    off, on = results
    return {"benchmark": "determinism", "date": now_iso(),
            "model": {"spec": cfg.model, "name": loaded.config.name, "dtype": str(loaded.dtype).removeprefix("torch.")},
            "hardware": hardware_info(), "config": asdict(cfg), "results": results,
            "throughput_cost": 1.0 - on["batch_output_tok_s"] / off["batch_output_tok_s"]}


def format_report(report: dict) -> str:
    from thrifty.bench.report import markdown_table

    m, h, c = report["model"], report["hardware"], report["config"]
    rows = [["on" if r["deterministic"] else "off", f"{r['differ']}/{r['requests']}", r["differ_greedy"],
             r["differ_seeded"], r["batch_output_tok_s"]] for r in report["results"]]
    return "\n".join([
        f"## determinism: {m['name']} ({m['dtype']}), {c['requests']} chat requests x {c['max_tokens']} tokens, "
        f"alone vs all in one batch",
        f"{h['cpu']}, {h['cores']} cores, {h['torch_threads']} torch threads, torch {h['torch_version']}; "
        f"{report['date']}", "",
        markdown_table(["deterministic", "batched != alone", "greedy", "seeded", "batch output tok/s"], rows), "",
        f"throughput cost of the mode at concurrency {c['requests']}: {report['throughput_cost']:.1%}"])
