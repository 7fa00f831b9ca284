"""The `thrifty bench` subcommand: argument parsing and the run (tables to stdout, progress to stderr)."""
from __future__ import annotations

import argparse
import sys

from thrifty.errors import InvalidRequestError
from thrifty.models.lm_head import FLAG_HELP as LM_HEAD_HELP, LM_HEADS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _range(text: str) -> tuple[int, int]:
    from thrifty.bench.workload import parse_range

    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo name, .gguf file or Hugging Face folder")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG plot (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--weights", default="auto",
                   help="weight format: auto, bf16, fp32, int8, int4[-gG], fp8, gguf, or a `thrifty quantize` folder")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--lm-head", default="auto", choices=LM_HEADS, help=LM_HEAD_HELP)
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB for thrifty's KV cache (default 1)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, all cores)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up steps")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: throughput (policies, peers), prefix caching")
    bsub = p.add_subparsers(dest="bench_command", required=True)

    t = bsub.add_parser("throughput", help="aggregate output tokens/s, TTFT, TPOT, KV waste over concurrency",
                        description="Closed loop: at concurrency C at most C requests are in flight and the next "
                                    "starts when one finishes, over --requests requests (default 2 C).")
    _common(t)
    t.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], help="e.g. 1,8,32")
    t.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens per request")
    t.add_argument("--output-len", type=int, default=128, help="new tokens per request (EOS ignored)")
    t.add_argument("--output-len-range", type=_range, default=None, metavar="LO:HI",
                   help="mixed output lengths drawn uniformly from LO..HI (seeded); overrides --output-len")
    t.add_argument("--policies", type=_name_list, default=["continuous"],
                   help="thrifty scheduler policies: continuous,static,bucketed")
    t.add_argument("--peers", type=_name_list, default=[], help="hf,llamacpp")
    t.add_argument("--requests", type=int, default=None,
                   help="requests per concurrency level (default 2 x concurrency, at least the concurrency)")
    t.add_argument("--max-model-len", type=int, default=None,
                   help="thrifty's context limit (default: the model's, capped by the KV cache); also the "
                        "per-request reservation behind kv_waste_contiguous")
    t.add_argument("--repeats", type=int, default=1,
                   help="thrifty runs per policy and concurrency, policy order alternating; ratios use medians "
                        "(a shared, noisy machine; default 1)")
    t.add_argument("--hf-requests", type=int, default=4,
                   help="requests the transformers peer times; more are extrapolated from them (default 4)")
    t.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"])

    st = bsub.add_parser("step", help="ms per decode step by phase and batch size, beside the physical floors",
                         description="Times pure decode steps of B sequences through LLMEngine.step, split into "
                                     "schedule / inputs / forward / logits / sampling / postprocess, with the "
                                     "profiler's kernel time and the bandwidth and compute floors measured in the "
                                     "same run.")
    _common(st)
    st.add_argument("--batch", type=_int_list, default=[1, 8, 32], help="batch sizes, e.g. 1,8,32,128")
    st.add_argument("--context", type=int, default=128, help="prompt tokens per sequence before the timed steps")
    st.add_argument("--steps", type=int, default=24, help="timed decode steps per batch size")
    st.add_argument("--profile-steps", type=int, default=6, help="steps under the profiler (0: none)")
    st.add_argument("--enforce-eager", action="store_true",
                    help="CUDA: time eager decode steps, not replayed CUDA graphs")

    sp = bsub.add_parser("spec", help="plain vs n-gram and draft-model speculative decoding: tok/s, acceptance",
                         description="Greedy chat / code-edit / summarize requests (HumanEval, pydoc passages) "
                                     "through the chat template, with speculation off, ngram and (with --draft) "
                                     "a draft model, per batch size.")
    _common(sp)
    sp.add_argument("--workloads", type=_name_list, default=["chat", "code-edit", "summarize"])
    sp.add_argument("--batch", type=_int_list, default=[1, 4, 16], help="max_num_seqs, e.g. 1,4,16")
    sp.add_argument("--requests", type=int, default=None, help="requests per cell (default: the batch, at least 2)")
    sp.add_argument("--output-len", type=int, default=128)
    sp.add_argument("--num-speculative-tokens", type=int, default=4)
    sp.add_argument("--ngram-min", type=int, default=2)
    sp.add_argument("--ngram-max", type=int, default=4)
    sp.add_argument("--disable-by-batch-size", type=int, default=None,
                    help="speculate only in steps with fewer running requests (default: the engine's)")
    sp.add_argument("--draft", default=None, help="method draft's model, same tokenizer as --model "
                                                  "(e.g. qwen2.5-coder-0.5b-instruct)")
    sp.add_argument("--draft-weights", default=None, help="the draft's weight format (default: --weights)")
    sp.add_argument("--methods", type=_name_list, default=None,
                    help="e.g. off,draft (default: off, ngram, and draft when --draft is given); draft+ngram: "
                         "n-gram lookup first, the draft where it finds nothing")
    sp.add_argument("--llamacpp", action="store_true",
                    help="also run llama.cpp's llama-server with its own speculation (same GGUFs, prompts, methods)")

    x = bsub.add_parser("prefix", help="TTFT and prompt tokens computed with and without prefix caching")
    _common(x)
    x.add_argument("--shared-prefix", type=int, default=2048, help="tokens every request shares")
    x.add_argument("--suffix", type=int, default=64, help="distinct tokens after the prefix")
    x.add_argument("--requests", type=int, default=16)
    x.add_argument("--output-len", type=int, default=8)

    f = bsub.add_parser("fairness", help="a long prompt beside decoding streams and short requests: TPOT, TTFT",
                        description="Runs the scheduler without a prefill budget (full chunks), then with each "
                                    "--slowdowns value (max_decode_slowdown).")
    _common(f)
    f.add_argument("--long", type=int, default=12_000, help="tokens of the long prompt (default 12000)")
    f.add_argument("--short", type=int, default=4, help="tokens of each short request's prompt (default 4)")
    f.add_argument("--short-every", type=float, default=1.0, help="seconds between short requests (default 1)")
    f.add_argument("--streams", type=int, default=2, help="requests decoding throughout (default 2)")
    f.add_argument("--slowdowns", default="2.0", help="max_decode_slowdown values to compare with off (default 2.0)")

    e = bsub.add_parser("spec-equality", help="greedy outputs with and without speculation on HumanEval chat prompts")
    e.add_argument("--model", required=True, help="zoo name, .gguf file or Hugging Face folder")
    e.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    e.add_argument("--plot", metavar="FILE.png", help="not drawn for this benchmark")
    e.add_argument("--method", default="ngram", choices=["ngram", "draft"])
    e.add_argument("--draft", default=None, help="method draft's model")
    e.add_argument("--prompts", type=int, default=164)
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float32"])
    e.add_argument("--weights", default="auto")

    d = bsub.add_parser("determinism", help="batched vs alone outputs with deterministic off and on, and its cost")
    d.add_argument("--model", required=True, help="zoo name, .gguf file or Hugging Face folder")
    d.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    d.add_argument("--plot", metavar="FILE.png", help="not drawn for this benchmark (a table says it all)")
    d.add_argument("--requests", type=int, default=32, help="HumanEval chat prompts, run alone and together")
    d.add_argument("--max-tokens", type=int, default=64)
    d.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--no-progress", dest="progress", action="store_false")

    w = bsub.add_parser("window", help="KV held by a sliding-window model at a long context, freeing blocks that "
                                       "left the window vs an unbounded cache, and their outputs")
    w.add_argument("--model", required=True, help="a model with sliding-window layers, e.g. gemma-3-270m")
    w.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    w.add_argument("--context", type=int, default=8192, help="prompt + output tokens (default 8192)")
    w.add_argument("--output-len", type=int, default=32, help="greedy tokens after the prompt (default 32)")
    w.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    w.add_argument("--weights", default="auto", help="weight format (as for the other benchmarks)")
    w.add_argument("--block-size", type=int, default=16)
    w.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill chunk (default 2048)")
    w.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> None:
    from thrifty.bench import report as rep

    if args.bench_command == "throughput":
        from thrifty.bench.throughput import ThroughputConfig, format_report, run_throughput

        cfg = ThroughputConfig(
            model=args.model, concurrency=args.concurrency, prompt_len=args.prompt_len, output_len=args.output_len,
            output_len_range=args.output_len_range, policies=args.policies, peers=args.peers,
            requests=args.requests, seed=args.seed, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
            block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, threads=args.threads, hf_requests=args.hf_requests,
            weights=args.weights, lm_head=args.lm_head, device=args.device,
            repeats=args.repeats, hf_dtype=args.hf_dtype, warmup=args.warmup, progress=args.progress)
        report = run_throughput(cfg)
        print(format_report(report))
        plot = rep.plot_throughput
    elif args.bench_command == "step":
        from thrifty.bench.step import StepConfig, format_report, run_step

        cfg = StepConfig(model=args.model, batch=args.batch, context=args.context, steps=args.steps,
                         profile_steps=args.profile_steps, weights=args.weights, lm_head=args.lm_head,
                         dtype=args.dtype,
                         device=args.device, threads=args.threads, block_size=args.block_size, seed=args.seed,
                         enforce_eager=args.enforce_eager, progress=args.progress)
        report = run_step(cfg)
        print(format_report(report))
        plot = rep.plot_step
    elif args.bench_command == "spec":
        from thrifty.bench.spec import SpecBenchConfig, format_report, run_spec

        cfg = SpecBenchConfig(
            model=args.model, workloads=args.workloads, batch=args.batch, requests=args.requests,
            output_len=args.output_len, num_tokens=args.num_speculative_tokens, ngram_min=args.ngram_min,
            ngram_max=args.ngram_max, disable_by_batch_size=args.disable_by_batch_size, weights=args.weights,
            lm_head=args.lm_head,
            dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, threads=args.threads, progress=args.progress,
            draft=args.draft, draft_weights=args.draft_weights, methods=args.methods, llamacpp=args.llamacpp)
        report = run_spec(cfg)
        print(format_report(report))
        plot = None
    elif args.bench_command == "prefix":
        from thrifty.bench.prefix import PrefixConfig, format_report, run_prefix

        cfg = PrefixConfig(
            model=args.model, shared_prefix=args.shared_prefix, suffix=args.suffix, requests=args.requests,
            output_len=args.output_len, seed=args.seed, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
            block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens, threads=args.threads,
            weights=args.weights, lm_head=args.lm_head, device=args.device, warmup=args.warmup,
            progress=args.progress)
        report = run_prefix(cfg)
        print(format_report(report))
        plot = rep.plot_prefix
    elif args.bench_command == "fairness":
        from thrifty.bench.fairness import FairnessConfig, format_report, run_fairness

        cfg = FairnessConfig(
            model=args.model, long=args.long, short=args.short, short_every_s=args.short_every, streams=args.streams,
            slowdowns=tuple(float(x) for x in _name_list(args.slowdowns)), seed=args.seed, dtype=args.dtype,
            weights=args.weights, lm_head=args.lm_head, device=args.device, kv_cache_memory=args.kv_cache_memory,
            max_num_batched_tokens=args.max_num_batched_tokens, threads=args.threads, progress=args.progress)
        report = run_fairness(cfg)
        print(format_report(report))
        plot = rep.plot_fairness
    elif args.bench_command == "determinism":
        from thrifty.bench.determinism import DeterminismConfig, format_report, run_determinism

        if args.requests < 2:
            raise InvalidRequestError("--requests must be >= 2", "", param="requests")
        report = run_determinism(DeterminismConfig(args.model, args.requests, args.max_tokens, args.dtype,
                                                   args.threads, args.progress))
        print(format_report(report))
        plot = None
    elif args.bench_command == "window":
        import torch

        from thrifty.bench.window import run_window_bench, summary

        if args.threads:
            torch.set_num_threads(args.threads)
        report = run_window_bench(args.model, args.context, args.output_len, args.dtype, args.weights,
                                  args.block_size, args.max_num_batched_tokens,
                                  log=lambda m: print(m, file=sys.stderr))
        print(summary(report))
        plot = None
    elif args.bench_command == "spec-equality":
        from thrifty.bench.spec_equality import format_report, run_equality

        report = run_equality(args.model, args.method, args.prompts, args.max_tokens, args.dtype, args.batch,
                              args.draft, args.weights)
        print(format_report(report))
        plot = None
    else:  # pragma: no cover (argparse requires one)
        raise InvalidRequestError(f"unknown bench command {args.bench_command}", "", param="bench_command")
    if args.json:
        print(f"\nwrote {rep.write_json(args.json, report)}")
    if getattr(args, "plot", None):
        if plot is None:     # said, not silently skipped: the user asked for a file that will not appear
            print(f"no plot for `bench {args.bench_command}` (its tables and --json carry the results); "
                  f"{args.plot} not written", file=sys.stderr)
        else:
            print(f"wrote {plot(report, args.plot)}")
