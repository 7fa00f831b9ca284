"""The `thrifty` command. Each subcommand is a thin shell over a library call; errors are one line, exit 2."""
from __future__ import annotations

import argparse
import sys

from thrifty.errors import ThriftyError


def _models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the offline model zoo: list, pull, path")
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="known models, whether they are present, and their sizes")
    pull = msub.add_parser("pull", help="install and assemble models into $THRIFTY_HOME")
    pull.add_argument("names", nargs="+")
    pull.add_argument("--force", action="store_true", help="assemble again even when present")
    path = msub.add_parser("path", help="print a model's local path (pulling it when missing)")
    path.add_argument("name")


def _run_models(args: argparse.Namespace) -> None:
    from thrifty.models import zoo

    if args.models_command == "list":
        print(zoo.format_table(zoo.list_models()))
    elif args.models_command == "pull":
        for name in args.names:
            print(zoo.pull(name, force=args.force))
    else:
        print(zoo.resolve(args.name))


def _generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt")
    p.add_argument("--model", required=True, help="zoo name, .gguf file or Hugging Face folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    p.add_argument("--weights", default="auto",
                   help="weight format: auto, bf16, fp32, int8, int4[-g32|-g64|-g128], fp8, gguf, or a quantized DIR")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    _enforce_eager_flag(p)
    _lm_head_flag(p, "auto")
    _kv_cache_dtype_flag(p, "auto")
    _speculative_flags(p)


def _enforce_eager_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="CUDA: run every decode step eagerly, never as a replayed CUDA graph")


def _lm_head_flag(p: argparse.ArgumentParser, default: str | None) -> None:
    from thrifty.models.lm_head import FLAG_HELP, LM_HEADS

    p.add_argument("--lm-head", default=default, choices=LM_HEADS,
                   help=FLAG_HELP + ("" if default else " (default: the config's engine.lm_head, else auto)"))


def _kv_cache_dtype_flag(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--kv-cache-dtype", default=default,
                   help="KV cache storage: auto (the model's dtype), bfloat16, float16, float32, int8, fp8_e4m3, "
                        "fp8_e5m2 (int8 / fp8: about half the bytes of bf16, a scale per token and KV head)"
                        + ("" if default else " (default: the config's engine.kv_cache_dtype, else auto)"))


def _speculative_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", choices=["off", "ngram", "draft"], default=None,
                   help="speculative decoding: ngram (prompt lookup) or draft (a smaller model with the same "
                        "tokenizer, --draft-model); default off")
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="most tokens proposed per step (4)")
    p.add_argument("--ngram-min", type=int, default=None, help="shortest n-gram prompt lookup matches (2)")
    p.add_argument("--ngram-max", type=int, default=None, help="longest n-gram, tried first (4)")
    p.add_argument("--draft-model", default=None, help="method draft: the proposing model")
    p.add_argument("--draft-weights", default=None, help="method draft: its weight format (default: the target's)")
    p.add_argument("--no-ngram-first", dest="ngram_first", action="store_false", default=None,
                   help="method draft: draft with the model every step (default: n-gram lookup first, the draft "
                        "model where it finds nothing)")


def _speculative_section(args: argparse.Namespace, base: dict | None = None) -> dict | None:
    """The engine's speculative section from the flags over `base` (the config file's); None: untouched."""
    flags = {"method": args.speculative, "num_tokens": args.num_speculative_tokens, "ngram_min": args.ngram_min,
             "ngram_max": args.ngram_max, "draft_model": args.draft_model,
             "draft_weights": getattr(args, "draft_weights", None), "ngram_first": getattr(args, "ngram_first", None)}
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return None
    section = dict(base) if isinstance(base, dict) else {"method": base} if isinstance(base, str) else {}
    return {**section, **given}


def _run_generate(args: argparse.Namespace) -> None:
    from thrifty.engine.engine import LLMEngine
    from thrifty.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    print(f"loading {args.model} ...", file=sys.stderr)
    engine = LLMEngine.from_model(args.model, dtype=args.dtype, kv_cache_memory=0.25, max_num_seqs=1,
                                   weights=args.weights, device=args.device, kv_cache_dtype=args.kv_cache_dtype,
                                   lm_head=args.lm_head, enforce_eager=bool(args.enforce_eager),
                                   speculative=_speculative_section(args))
    prompt: str | list[int] = args.prompt
    if args.chat:
        rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = engine.tokenizer.encode(rendered, add_special_tokens=False)
    engine.add_request(prompt, params)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    while engine.has_unfinished():  # stream the text as it comes
        for out in engine.step():
            print(out.delta_text, end="", flush=True)
    print()


def _serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    p.add_argument("--config", help="YAML config file (model, engine, server sections)")
    p.add_argument("--model", help="zoo name, .gguf file or Hugging Face folder (default: the config's, "
                                   "else qwen2.5-coder-0.5b-instruct)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--device", help="auto, cpu or cuda (default: the config's engine.device, else auto)")
    _enforce_eager_flag(p)
    p.add_argument("--api-key", help="require this bearer token (default: $THRIFTY_API_KEY, or the variable "
                                     "named by server.api_key_env; unset: no auth)")
    _kv_cache_dtype_flag(p, None)
    _lm_head_flag(p, None)
    _speculative_flags(p)


def _run_serve(args: argparse.Namespace) -> None:
    from thrifty.config import load_config
    from thrifty.server.run import serve

    config = load_config(args.config)
    if args.model:
        config.model = args.model
    if args.host:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    if args.device:
        config.engine["device"] = args.device
    if args.enforce_eager:
        config.engine["enforce_eager"] = True
    if args.kv_cache_dtype:
        config.engine["kv_cache_dtype"] = args.kv_cache_dtype
    if args.lm_head:
        config.engine["lm_head"] = args.lm_head
    speculative = _speculative_section(args, config.engine.get("speculative"))
    if speculative is not None:
        config.engine["speculative"] = speculative
    serve(config, args.api_key or config.server.api_key())


def _bench(sub: argparse._SubParsersAction) -> None:
    from thrifty.bench import quant
    from thrifty.bench.command import add_parser

    add_parser(sub)
    bench = sub.choices["bench"]  # the quant suite joins bench's own subcommands
    suites = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    if "quant" not in suites.choices:
        quant.add_parser(suites)
    if "router" not in suites.choices:
        from thrifty.bench import router

        router.add_parser(suites)
    if "gateway" not in suites.choices:
        from thrifty.bench import gateway

        gateway.add_parser(suites)
    if "serve" not in suites.choices:
        from thrifty.bench import serve_command

        serve_command.add_parser(suites)
    if "soak" not in suites.choices:
        from thrifty.bench import soak_command

        soak_command.add_parser(suites)
    if "kv" not in suites.choices:
        from thrifty.bench import kv

        kv.add_parser(suites)


def _run_bench(args: argparse.Namespace) -> None:
    if getattr(args, "bench_command", None) == "quant":
        from thrifty.bench.quant import run as run_quant

        run_quant(args)
        return
    if getattr(args, "bench_command", None) == "router":
        from thrifty.bench.router import run as run_router

        run_router(args)
        return
    if getattr(args, "bench_command", None) == "kv":
        from thrifty.bench.kv import run as run_kv

        run_kv(args)
        return
    if getattr(args, "bench_command", None) == "gateway":
        from thrifty.bench.gateway import run as run_gateway

        run_gateway(args)
        return
    if getattr(args, "bench_command", None) == "soak":
        from thrifty.bench.soak_command import run as run_soak

        run_soak(args)
        return
    if getattr(args, "bench_command", None) == "serve":
        from thrifty.bench.serve_command import run as run_serve_bench

        run_serve_bench(args)
        return
    from thrifty.bench.command import run

    run(args)


def _cache(sub: argparse._SubParsersAction) -> None:
    from thrifty.bench.cache_command import add_parser

    add_parser(sub)


def _run_cache(args: argparse.Namespace) -> None:
    from thrifty.bench.cache_command import run

    run(args)


def _router(sub: argparse._SubParsersAction) -> None:
    from thrifty.bench.router_command import add_parser

    add_parser(sub)


def _run_router(args: argparse.Namespace) -> None:
    from thrifty.bench.router_command import run

    run(args)


def _report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="cost and savings from the cost ledger, by tier and overall; `report claims`: "
                                      "the seed's claims, measured within a budget")
    p.add_argument("what", nargs="?", choices=["claims"], help="claims: run the claims' benchmarks (see --out)")
    p.add_argument("--budget-min", type=float, default=30.0, help="claims: minutes the benchmarks may take")
    p.add_argument("--out", help="claims: the folder for claims.html / .md / .json (default claims-report)")
    p.add_argument("--since", help="only requests from this ISO 8601 date or time on (e.g. 2025-01-31)")
    p.add_argument("--plot", metavar="FILE.png", help="also plot cost against the baseline")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--config", help="the serve config: its server.ledger_path and its tiers' order")
    p.add_argument("--ledger", metavar="FILE", help="the ledger file (default: server.ledger_path, else "
                                                    "$THRIFTY_HOME/ledger/ledger.sqlite3)")


def _run_report(args: argparse.Namespace) -> None:
    if args.what == "claims":
        from thrifty.bench.claims import run_claims, write

        out = args.out or "claims-report"
        for path in write(run_claims(args.budget_min, out), out):
            print(f"wrote {path}")
        return
    from thrifty.bench.report import write_json
    from thrifty.config import load_config
    from thrifty.gateway.ledger import open_ledger, parse_since
    from thrifty.gateway.tiers import ledger_path

    config = load_config(args.config)
    since = parse_since(args.since)
    ledger = open_ledger(args.ledger or ledger_path(config))
    try:
        report = ledger.report(since, [t.name for t in config.tiers()] if args.config else None)
    finally:
        ledger.close()
    print(report.table())
    t = report.total
    print(f"\n{t.requests} requests: ${t.cost_usd:.6f} spent, ${t.baseline_usd:.6f} on the baseline tier alone; "
          f"saved ${t.saved_routing_usd:.6f} by routing and ${t.saved_cache_usd:.6f} by caching")
    if args.json:
        print(f"wrote {write_json(args.json, report.as_dict())}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")


def _quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model's weights (RTN, AWQ, GPTQ) into a folder --model can load")
    p.add_argument("--model", required=True, help="zoo name, .gguf file or Hugging Face folder")
    p.add_argument("--method", required=True, choices=["rtn", "awq", "gptq"])
    p.add_argument("--bits", type=int, required=True, help="4 or 8")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4: 32, 64, 128 or 256 (default: the one `thrifty bench quant` chose, see the README); "
                        "none for 8 bits")
    p.add_argument("--out", required=True, help="output folder (safetensors + config.json + tokenizer)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ: quantize columns in their natural order instead of by decreasing activation energy")


def _run_quantize(args: argparse.Namespace) -> None:
    from thrifty.quantizers.quantize import quantize_model

    out = quantize_model(args.model, args.method, args.bits, args.out, args.group_size, args.calib_samples,
                         args.calib_seq_len, args.seed, threads=args.threads, act_order=args.act_order)
    print(out)


def _eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="quality: perplexity and KL divergence against bf16")
    esub = p.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("ppl", help="perplexity on held-out stdlib code and prose, KL vs bf16, weight bytes")
    e.add_argument("--model", required=True, help="zoo name, .gguf file, Hugging Face or quantized folder")
    e.add_argument("--weights", default="auto", help="auto, bf16, int8, int4[-gG], fp8, gguf, or a quantized DIR")
    _lm_head_flag(e, "auto")
    e.add_argument("--max-eval-tokens", type=int, default=4096, help="held-out tokens, half code, half prose")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    e.add_argument("--json", metavar="FILE", help="write the result as JSON")
    e.add_argument("--threads", type=int, default=None)


def _run_eval(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from thrifty.bench.ppl import eval_ppl

    result = eval_ppl(args.model, args.weights, args.max_eval_tokens, args.seq_len, threads=args.threads,
                      lm_head=args.lm_head)
    kl = result["kl_vs_bf16"]
    print(f"weights {result['weights']}: ppl {result['ppl']:.4f} (code {result['ppl_code']:.4f}, prose "
          f"{result['ppl_prose']:.4f}), KL vs bf16 {'-' if kl is None else f'{kl:.5f}'}, "
          f"weights {result['weight_bytes'] / 2**20:.1f} MiB (linear {result['linear_weight_bytes'] / 2**20:.1f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


def _keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="virtual API keys: each with a tenant, rate limits and a budget")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    a = ksub.add_parser("add", help="make a key (shown once) for `thrifty serve` with server.virtual_keys: true")
    a.add_argument("--tenant", required=True, help="whose requests these are (cache scope, ledger)")
    a.add_argument("--rpm", type=int, default=None, help="requests per minute (default: no limit)")
    a.add_argument("--tpm", type=int, default=None, help="prompt + completion tokens per minute (default: no limit)")
    a.add_argument("--budget-usd", type=float, default=None, help="USD per --period, from the cost ledger")
    a.add_argument("--period", default="month", choices=["day", "month"], help="the budget's period (UTC)")
    ksub.add_parser("list", help="the keys (ids, tenants, limits; never the keys themselves)")
    r = ksub.add_parser("revoke", help="revoke a key by its id (key-...)")
    r.add_argument("key_id")
    for q in ksub.choices.values():
        q.add_argument("--path", default=None, help="the key store (default $THRIFTY_HOME/keys/keys.sqlite3)")


def _run_keys(args: argparse.Namespace) -> None:
    from thrifty.server.api_keys import KeyStore

    store = KeyStore(args.path)
    if args.keys_command == "add":
        secret, key = store.add(args.tenant, args.rpm, args.tpm, args.budget_usd, args.period)
        print(f"{key.key_id} for tenant {key.tenant}: {secret}\n(shown once; it is stored hashed)")
    elif args.keys_command == "list":
        from thrifty.reporting import markdown_table

        rows = [(k.key_id, k.tenant, k.rpm, k.tpm, k.budget_usd, k.period, "revoked" if k.revoked else "active")
                for k in store.list()]
        print(markdown_table(("key", "tenant", "rpm", "tpm", "budget $", "period", "status"), rows))
    elif not store.revoke(args.key_id):
        raise ThriftyError(f"no active key {args.key_id}", "see `thrifty keys list`")
    else:
        print(f"revoked {args.key_id}")


COMMANDS = {"models": (_models, _run_models), "generate": (_generate, _run_generate),
            "serve": (_serve, _run_serve), "bench": (_bench, _run_bench),
            "quantize": (_quantize, _run_quantize), "eval": (_eval, _run_eval), "cache": (_cache, _run_cache),
            "router": (_router, _run_router), "report": (_report, _run_report), "keys": (_keys, _run_keys)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thrifty", description="LLM serving at the lowest cost per token.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except ThriftyError as e:
        print(f"thrifty: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("thrifty: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
