"""`thrifty bench serve`: its arguments and its run (table to stdout, progress to stderr, JSON, PNG)."""
from __future__ import annotations

import argparse
import json

from thrifty.bench.arrivals import parse_rates
from thrifty.bench.serve_data import DATASETS, DatasetSpec
from thrifty.bench.serve_metrics import parse_goodput


def _checked(parse):
    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return wrapped


def add_parser(sub: argparse._SubParsersAction) -> None:
    from thrifty.bench.serve_peers import MODIFIERS

    p = sub.add_parser("serve", help="an OpenAI-compatible server under Poisson arrivals: TTFT / TPOT / ITL, "
                                     "goodput, per request rate",
                       description="Streams chat requests at each --request-rate (Poisson, or gamma with "
                                   "--burstiness) to --base-url, or to servers it starts itself (--serve).")
    p.add_argument("--model", required=True, help="the model name sent; with --serve, the zoo name or .gguf")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    target.add_argument("--serve", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                        help="start these servers one after another on the same model: llama-server (llama.cpp's C++ "
                             "server, `make llama-server`), llamacpp (llama-cpp-python's), thrifty, and thrifty "
                             f"with +modifiers ({', '.join(MODIFIERS)}), e.g. thrifty+gguf,llama-server")
    p.add_argument("--dataset", choices=DATASETS, default="sharegpt")
    p.add_argument("--dataset-path", help="ShareGPT: another copy of the JSON file (default: the package's)")
    p.add_argument("--num-prompts", type=int, default=50, help="requests per rate (default 50)")
    p.add_argument("--request-rate", type=_checked(parse_rates), default=[float("inf")],
                   help="requests/s, comma-separated, inf for all at once (default inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--goodput", type=_checked(parse_goodput), default={},
                   help="SLOs in ms, e.g. ttft:2000,tpot:200")
    p.add_argument("--input-len", type=int, default=256, help="random / shared-prefix: tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="humaneval / random / shared-prefix: max_tokens")
    p.add_argument("--max-output-len", type=int, default=None, help="ShareGPT: cap the reply's length")
    p.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens per system prompt")
    p.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct system prompts")
    p.add_argument("--tokenizer", help="count tokens with this model's tokenizer (default: --model)")
    p.add_argument("--threads", type=int, default=2, help="--serve: threads of each server (default 2)")
    p.add_argument("--api-key", help="bearer token for --base-url")
    p.add_argument("--extra-body", type=json.loads, default={}, help='JSON merged into every request')
    p.add_argument("--warmup", type=int, default=2, help="short requests sent before measuring (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG plot")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> None:
    from thrifty.bench import report as rep
    from thrifty.bench.serve import ServeConfig, format_report, run_serve

    dataset = DatasetSpec(args.dataset, args.num_prompts, args.seed, args.input_len, args.output_len,
                          args.max_output_len, args.prefix_len, args.num_prefixes, args.dataset_path)
    cfg = ServeConfig(args.model, dataset, args.request_rate, args.base_url, args.serve or [], args.burstiness,
                      args.max_concurrency, args.goodput, args.threads, args.tokenizer, args.api_key,
                      args.extra_body, args.warmup, args.seed, args.progress)
    report = run_serve(cfg)
    print(format_report(report))
    if args.json:
        print(f"\nwrote {rep.write_json(args.json, report)}")
    if args.plot:
        print(f"wrote {rep.plot_serve(report, args.plot)}")
