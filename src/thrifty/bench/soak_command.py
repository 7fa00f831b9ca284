"""`thrifty bench soak`: its arguments, its table (stdout), JSON and PNG plot."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="a thrifty server at a multiple of its sustainable rate for a long time, with "
                                    "short, long, streamed, cancelled and malformed requests",
                       description="Starts `thrifty serve`, measures the rate it sustains, then sends a hostile mix "
                                   "at --rate-factor x that rate: 5xx, lost requests, RSS, 429s, TTFT / TPOT over time.")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="zoo name or .gguf")
    p.add_argument("--duration-s", type=float, default=1200.0, help="soak length (default 1200 = 20 min)")
    p.add_argument("--rate-factor", type=float, default=1.5, help="times the measured sustainable rate (default 1.5)")
    p.add_argument("--rate", type=float, default=None, help="req/s to send (skips the calibration)")
    p.add_argument("--calibrate-s", type=float, default=90.0, help="closed-loop run that measures the rate")
    p.add_argument("--calibrate-concurrency", type=int, default=16, help="requests in flight while calibrating")
    p.add_argument("--deadline-s", type=float, default=30.0, help="the tier's timeout_s (admission's deadline)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="the server's batch size")
    p.add_argument("--max-waiting", type=int, default=16, help="the server's max_waiting_requests")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=120.0, help="RSS growth is measured from this stretch's peak")
    p.add_argument("--window-s", type=float, default=60.0, help="rows of the table")
    p.add_argument("--mix", type=json.loads, default=None, help='kind weights as JSON, e.g. {"short": 1}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, help="write soak.json, soak.md and soak.png here")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> None:
    from thrifty.bench import report as rep
    from thrifty.bench.soak import SoakConfig, run_soak
    from thrifty.bench.soak_report import format_report, plot_soak

    cfg = SoakConfig(args.model, args.duration_s, args.rate_factor, args.rate, args.calibrate_s,
                     args.calibrate_concurrency, args.deadline_s,
                     args.max_num_seqs, args.max_waiting, args.threads, args.warmup_s, args.window_s,
                     seed=args.seed, progress=args.progress)
    if args.mix:
        cfg.mix = {k: float(v) for k, v in args.mix.items()}
    report = run_soak(cfg)
    text = format_report(report)
    print(text)
    if args.out_dir:
        print(f"\nwrote {rep.write_json(args.out_dir / 'soak.json', report)}")
        (args.out_dir / "soak.md").write_text(text + "\n")
        print(f"wrote {args.out_dir / 'soak.md'}")
        print(f"wrote {plot_soak(report, args.out_dir / 'soak.png')}")
