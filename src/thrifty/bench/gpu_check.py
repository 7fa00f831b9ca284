"""`python -m thrifty.bench.gpu_check MODEL_DIR --out DIR`: one run on a CUDA machine that checks and times the
decode path with CUDA graphs against the eager one. A machine lent for minutes runs it once; CI never does.

  1. correctness, float32: thrifty greedy (graphs, then eager) against transformers teacher-forced on the same
     tokens: every token the argmax of transformers' logits, the largest |logprob difference|;
  2. bf16 greedy, graphs vs eager, a batch of prompts: how many outputs are identical (padding rows change a
     GEMM's row count, which may change cuBLAS's kernel and so bf16 rounding);
  3. decode steps (`thrifty bench step`'s measurement): step ms, kernel ms, launches per step, graphs vs eager;
  4. closed-loop output tok/s at several concurrencies (128-token prompts, 128 new tokens), graphs vs eager.
Prints a summary and writes DIR/gpu_check.json; each part is guarded, so one failing still reports the rest.
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prompts(n: int, length_range: tuple[int, int], high: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, high) for _ in range(rng.randrange(*length_range))] for _ in range(n)]


def _high(loaded) -> int:
    """Random prompt ids stay below this: ordinary tokens of any vocabulary, the tiny test models' included."""
    return min(5000, loaded.config.vocab_size)


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
    from transformers import AutoModelForCausalLM

    from thrifty.engine.sampling import SamplingParams
    from thrifty.models.loader import load

    loaded = load(model_dir, "float32", device)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device).eval()
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


def throughput(loaded, concurrencies: list[int], budget_s: float, prompt_len: int = 128, output_len: int = 128
               ) -> dict:
    from thrifty.bench.engine_run import make_engine, run_closed_loop, warm_up
    from thrifty.bench.workload import random_requests

    out = {}
    for c in concurrencies:
        requests = random_requests(max(2 * c, 2), prompt_len, output_len, _high(loaded), seed=c)
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
                         "graphs": _graph_state(engine)}
            engine.abort_all()
        row["graphs_over_eager"] = row["graphs"]["output_tok_s"] / row["eager"]["output_tok_s"]
        row["graphs_over_eager_without_captures"] = (row["graphs"]["output_tok_s_without_captures"]
                                                     / row["eager"]["output_tok_s"])
        out[str(c)] = row
        log(f"c={c}: {json.dumps(row)}")
        if time.perf_counter() > budget_s:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--concurrency", default="1,32,128")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting throughput runs after this")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
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
    part("throughput", lambda: throughput(loaded, [int(c) for c in args.concurrency.split(",")],
                                          start + args.budget_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
