"""`python -m thrifty.bench.gpu_check MODEL_DIR --out DIR`: one run on a CUDA machine that checks and times the
decode path with CUDA graphs against the eager one, and thrifty against transformers. A machine lent for minutes
runs it once; CI never does (its tests run it on a CPU with a tiny GGUF, which MODEL_DIR may also be).

  1. correctness, float32: thrifty greedy (graphs, then eager) against transformers teacher-forced on the same
     tokens: every token the argmax of transformers' logits, the largest |logprob difference|;
  2. bf16 greedy, graphs vs eager, a batch of prompts: how many outputs are identical (padding rows change a
     GEMM's row count, which may change cuBLAS's kernel and so bf16 rounding);
  3. decode steps (`thrifty bench step`'s measurement): step ms, kernel ms, launches per step, graphs vs eager;
  4. closed-loop output tok/s at several concurrencies (128-token prompts, 128 new tokens), graphs vs eager;
  5. transformers `generate` (bf16, greedy, 128 new tokens per row) on one static batch of each concurrency's
     first prompts: output tok/s, and thrifty's (graphs) over it. A row that took over a minute skips the larger
     ones (`--skip-hf` skips them all).
Prints a summary table and writes DIR/gpu_check.json; each part is guarded, so one failing still reports the rest.
The issue's targets (thrifty >= 5x transformers at c=32, >= 20,000 tok/s at c=256 on an H200) are printed beside
the table, never asserted: the check measures.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch

from thrifty.bench.workload import BenchRequest, random_requests

HF_ROW_LIMIT_S = 60.0   # a transformers row slower than this skips the larger batches (they take longer still)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prompts(n: int, length_range: tuple[int, int], high: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, high) for _ in range(rng.randrange(*length_range))] for _ in range(n)]


def _high(loaded) -> int:
    """Random prompt ids stay below this: ordinary tokens of any vocabulary, the tiny test models' included."""
    return min(5000, loaded.config.vocab_size)


def _requests(high: int, c: int, prompt_len: int, output_len: int) -> list[BenchRequest]:
    """The closed loop's requests at concurrency c (2c of them); transformers' static batch is the first c."""
    return random_requests(max(2 * c, 2), prompt_len, output_len, high, seed=c)


def _skip_reason(deadline: float, previous: tuple[int, float] | None = None, row_limit_s: float = float("inf")
                 ) -> str | None:
    """Why a row is not run, or None: the check is past its deadline, or the previous row, (concurrency, wall
    seconds), took longer than a row may."""
    if time.perf_counter() > deadline:
        return "the check's time budget (--budget-s) was spent"
    if previous is not None and previous[1] > row_limit_s:
        return f"c={previous[0]} took {previous[1]:.0f} s, over {row_limit_s:.0f} s"
    return None


def _kv_blocks(seqs: int, tokens: int) -> int:
    """KV blocks (the engine's default 16 tokens each) for `seqs` sequences of up to `tokens` tokens."""
    return seqs * (tokens // 16 + 2)


def _engine(loaded, eager: bool, prompts: list[list[int]], new_tokens: int):
    """An engine that holds all of `prompts` at once, each with `new_tokens` more."""
    from thrifty.engine.engine import EngineConfig, LLMEngine

    blocks = _kv_blocks(len(prompts), max(len(p) for p in prompts) + new_tokens)
    return LLMEngine(loaded, EngineConfig(device=str(loaded.device), num_kv_blocks=blocks,
                                          max_num_seqs=len(prompts), enforce_eager=eager))


def _graph_state(engine) -> str:
    return "eager" if engine.runner.graphs is None else engine.runner.graphs.state


def correctness(model_dir: str, device: str, tokens: int) -> dict:
    """float32 thrifty (graphs and eager) vs transformers on the tokens thrifty chose."""
    from thrifty.bench.hf_peer import load_hf_model
    from thrifty.engine.sampling import SamplingParams
    from thrifty.models.loader import load

    loaded = load(model_dir, "float32", device)
    hf = load_hf_model(Path(model_dir), torch.float32).to(device)
    prompts = _prompts(6, (8, 60), _high(loaded), seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    out: dict = {}
    for mode in ("graphs", "eager"):
        engine = _engine(loaded, mode == "eager", prompts, tokens)
        results = engine.run(prompts, [params] * len(prompts))
        argmax_ok, worst = 0, 0.0
        for p, r in zip(prompts, results):
            ids = torch.tensor([p + r.token_ids], device=device)
            with torch.inference_mode():
                logp = torch.log_softmax(hf(ids).logits[0, len(p) - 1:-1].float(), dim=-1)
            ref = logp.argmax(-1).tolist()
            argmax_ok += sum(a == b for a, b in zip(ref, r.token_ids))
            got = torch.tensor([lp.logprob for lp in r.logprobs], device=device)
            want = logp.gather(1, torch.tensor(r.token_ids, device=device)[:, None])[:, 0]
            worst = max(worst, (got - want).abs().max().item())
        out[mode] = {"tokens_argmax_of_transformers": f"{argmax_ok}/{len(prompts) * tokens}",
                     "max_abs_logprob_diff": worst, "graphs": _graph_state(engine),
                     "token_ids": [r.token_ids for r in results]}
    out["graphs_equal_eager"] = out["graphs"]["token_ids"] == out["eager"]["token_ids"]
    for mode in ("graphs", "eager"):
        del out[mode]["token_ids"]
    return out


def bf16_agreement(loaded, tokens: int, batch: int) -> dict:
    from thrifty.engine.sampling import SamplingParams

    prompts = _prompts(batch, (16, 200), _high(loaded), seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outs = {}
    for mode in ("graphs", "eager"):
        engine = _engine(loaded, mode == "eager", prompts, tokens)
        outs[mode] = [r.token_ids for r in engine.run(prompts, [params] * batch)]
    same = sum(a == b for a, b in zip(outs["graphs"], outs["eager"]))
    return {"identical": f"{same}/{batch}", "tokens": tokens}


def steps(model_dir: str, device: str, batches: list[int]) -> dict:
    from thrifty.bench.step import StepConfig, run_step

    out = {}
    for mode in ("graphs", "eager"):
        report = run_step(StepConfig(model=model_dir, batch=batches, steps=24, profile_steps=3, dtype="bfloat16",
                                     device=device, enforce_eager=mode == "eager", progress=False))
        out[mode] = [{k: r[k] for k in ("batch", "step_ms", "tokens_per_s", "kernel_ms", "launches_per_step",
                                        "floor_ms", "cuda_graphs")} for r in report["results"]]
    return out


def throughput(loaded, concurrencies: list[int], deadline: float, prompt_len: int = 128, output_len: int = 128
               ) -> dict:
    from thrifty.bench.engine_run import make_engine, run_closed_loop, warm_up

    out: dict = {}
    for c in concurrencies:
        why = _skip_reason(deadline) if out else None      # the first row always runs
        if why:
            out[str(c)] = {"skipped": why}
            continue
        requests = _requests(_high(loaded), c, prompt_len, output_len)
        row = {}
        for mode in ("graphs", "eager"):
            options = {"device": str(loaded.device), "enforce_eager": mode == "eager",
                       "num_kv_blocks": _kv_blocks(c, prompt_len + output_len)}
            warm_up(loaded, options, requests[0].prompt_ids, concurrency=min(c, 4))
            engine = make_engine(loaded, **options, max_num_seqs=c)
            wall, outs = run_closed_loop(engine, requests, c, progress=False)
            tokens = sum(len(o.token_ids) for o in outs)
            graphs = engine.runner.graphs
            capture_s = graphs.capture_s if graphs is not None else 0.0
            row[mode] = {"output_tok_s": tokens / wall, "wall_s": wall, "capture_s": capture_s,
                         "output_tok_s_without_captures": tokens / (wall - capture_s),
                         "graphs": _graph_state(engine),
                         "preemptions": engine.stats.preemptions}   # 0: the KV cache held all c at once
            engine.abort_all()
        row["graphs_over_eager"] = row["graphs"]["output_tok_s"] / row["eager"]["output_tok_s"]
        row["graphs_over_eager_without_captures"] = (row["graphs"]["output_tok_s_without_captures"]
                                                     / row["eager"]["output_tok_s"])
        out[str(c)] = row
        log(f"c={c}: {json.dumps(row)}")
    return out


def hf_generate(model, high: int, concurrencies: list[int], deadline: float, thrifty: dict,
                prompt_len: int = 128, output_len: int = 128, row_limit_s: float = HF_ROW_LIMIT_S) -> dict:
    """transformers `generate` on one static batch of each concurrency's first c prompts (those thrifty's closed
    loop starts with): output tok/s, and `thrifty_over_hf`, thrifty's graphs output tok/s (captures included)
    from the `thrifty` throughput rows over it."""
    from thrifty.bench.hf_peer import generate_batch

    generate_batch(model, [[10] * 8], 2)        # warm-up: first-call costs (cuBLAS handles) not charged to c=1
    out: dict = {}
    previous = None
    for c in concurrencies:
        why = _skip_reason(deadline, previous, row_limit_s) if out else None     # as throughput's
        if why:
            out[str(c)] = {"skipped": why}
            continue
        prompts = [r.prompt_ids for r in _requests(high, c, prompt_len, output_len)[:c]]
        wall, tokens = generate_batch(model, prompts, output_len)
        row = {"output_tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens}
        ours = thrifty.get(str(c), {}).get("graphs", {}).get("output_tok_s")
        row["thrifty_over_hf"] = ours / row["output_tok_s"] if ours else None
        out[str(c)] = row
        previous = (c, wall)
        log(f"hf c={c}: {json.dumps(row)}")
    return out


TARGETS = "issue targets (H200): thrifty >= 5x transformers at c=32; >= 20,000 output tok/s at c=256"


def summary(report: dict) -> str:
    """The throughput rows beside the transformers rows, one line per concurrency; '-' where a row did not run."""
    from thrifty.bench.report import markdown_table

    ours, hf = report.get("throughput", {}), report.get("hf_generate", {})
    rows = []
    for c in dict.fromkeys([*ours, *hf]):       # both parts' concurrencies, in order; an error entry has none
        if not c.isdigit():
            continue
        t, h = ours.get(c, {}), hf.get(c, {})
        skipped = "; ".join(f"{name}: {row['skipped']}" for name, row in (("thrifty", t), ("transformers", h))
                            if "skipped" in row)
        rows.append([int(c), t.get("graphs", {}).get("output_tok_s"), t.get("eager", {}).get("output_tok_s"),
                     t.get("graphs_over_eager"), h.get("output_tok_s"), h.get("thrifty_over_hf"), skipped])
    headers = ["c", "thrifty graphs tok/s", "thrifty eager tok/s", "graphs / eager", "transformers tok/s",
               "thrifty / transformers", "skipped"]
    return markdown_table(headers, rows) + "\n" + TARGETS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--concurrency", default="1,32,128,256", help="closed-loop clients and static batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the throughput requests")
    ap.add_argument("--output-len", type=int, default=128, help="new tokens of the throughput requests")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers rows")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="start no throughput or transformers row but each part's first after this many seconds")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from thrifty.bench.hf_peer import load_hf_model
    from thrifty.bench.stats import hardware_info
    from thrifty.models.loader import load

    start = time.perf_counter()
    report: dict = {"hardware": hardware_info(), "torch": torch.__version__}

    def part(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001 - report it and go on to the next part
            report[name] = {"error": traceback.format_exc()[-3000:]}
        report[name + "_s"] = time.perf_counter() - t0
        log(f"== {name} ({report[name + '_s']:.0f} s): {json.dumps(report[name], default=str)[:1500]}")
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    part("correctness_fp32", lambda: correctness(args.model_dir, args.device, args.tokens))
    loaded = load(args.model_dir, "bfloat16", args.device)
    part("bf16_graphs_vs_eager", lambda: bf16_agreement(loaded, args.tokens, 16))
    part("steps", lambda: steps(args.model_dir, args.device, [int(b) for b in args.batches.split(",")]))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    deadline, lengths = start + args.budget_s, {"prompt_len": args.prompt_len, "output_len": args.output_len}
    part("throughput", lambda: throughput(loaded, concurrencies, deadline, **lengths))
    if not args.skip_hf:
        part("hf_generate", lambda: hf_generate(load_hf_model(Path(args.model_dir), torch.bfloat16).to(args.device),
                                                _high(loaded), concurrencies, deadline, report["throughput"],
                                                **lengths))
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
