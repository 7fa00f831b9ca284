"""`thrifty bench router`: pass@1 and cost of small-only, large-only, classifier, cascade and the oracle on
held-out HumanEval problems, all from one run.

Both tiers answer every problem (greedy, all problems in one batch per tier) and are timed; their `auto`
prices come from the prefill and decode rates measured in this same run and router.machine_usd_per_hour.
Each strategy's outcome is then composed from those answers: the classifier router and the cascade's
check make their real decisions (MiniLM + the trained model; the sandboxed code check on the small
tier's answer), and a problem costs the answers its path asked for (an escalated cascade pays both). With
greedy decoding an answer is what the gateway would have received for that tier, so no strategy's answer is
generated twice. The same decisions are then priced at the seed's price table.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from thrifty.bench.report import fmt, markdown_table, write_json
from thrifty.config import RouterSettings
from thrifty.gateway.costs import Price

STRATEGIES = ("small-only", "large-only", "classifier", "cascade", "oracle")
# The seed's price table (USD per 1M tokens): a local 8B, a hosted 70B, a cloud frontier API ($3 in, $15 out).
SEED_PRICES = {
    "8B -> 70B": (Price(0.03, 0.03, 0.03), Price(0.12, 0.12, 0.12)),
    "8B -> cloud": (Price(0.03, 0.03, 0.03), Price(3.0, 3.0, 15.0)),
}
HELD_OUT = "100-163"


def add_parser(suites: argparse._SubParsersAction) -> None:
    from thrifty.bench.router_command import add_router_args, add_run_args

    p = suites.add_parser("router", help="routing strategies on held-out HumanEval: pass@1 and cost")
    add_run_args(p, HELD_OUT)
    add_router_args(p)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")


def run(args: argparse.Namespace) -> dict:
    from thrifty.bench.humaneval import Outcomes, load_problems, run_tier
    from thrifty.bench.stats import hardware_info, now_iso
    from thrifty.gateway.classifier_router import ClassifierRouter
    from thrifty.gateway.cascade import CascadeRouter
    from thrifty.gateway.costs import auto_price
    from thrifty.gateway.router import RouteRequest

    first, last = args.problems
    if first < 100:
        print(f"thrifty: warning: problems {first}-{min(last, 99)} are the router's training data; "
              "their results flatter the classifier", file=sys.stderr)
    settings = RouterSettings(strategy="cascade", check=args.check, classifier_path=args.classifier,
                              calibration_path=args.calibration, machine_usd_per_hour=args.machine_usd_per_hour)
    tiers = ["small", "large"]
    classifier = ClassifierRouter.from_settings(settings, tiers)     # fails fast when it was never trained
    cascade = CascadeRouter.from_settings(settings, tiers)
    problems = load_problems(first, last)
    runs = [run_tier("small", args.small, problems, args.max_tokens),
            run_tier("large", args.large, problems, args.max_tokens)]
    prices = {r.tier: auto_price(args.machine_usd_per_hour, r.prefill_tokens_per_s, r.decode_tokens_per_s,
                                 settings.cached_input_fraction) for r in runs}
    outcomes = Outcomes.from_runs(runs, prices)
    requests = [RouteRequest(p.request_text(), p.messages()) for p in problems]
    small_answers = [a.answer() for a in runs[0].attempts]
    routes = [classifier.choose(r) for r in requests]
    escalations = [cascade.escalate(r, a, "small") for r, a in zip(requests, small_answers)]
    paths = {
        "small-only": [["small"]] * len(problems),
        "large-only": [["large"]] * len(problems),
        "classifier": [[route.tier] for route in routes],
        "cascade": [["small", "large"] if up else ["small"] for up, _ in escalations],
        "oracle": outcomes.oracle_paths(),
    }
    report = {
        "benchmark": "router", "created": now_iso(), "hardware": hardware_info(),
        "problems": f"{first}-{last}", "max_tokens": args.max_tokens,
        "machine_usd_per_hour": args.machine_usd_per_hour,
        "tiers": {r.tier: {"model": r.model, "prefill_tokens_per_s": r.prefill_tokens_per_s,
                           "decode_tokens_per_s": r.decode_tokens_per_s, "prefill_s": r.prefill_s,
                           "generate_s": r.generate_s, "prompt_tokens": r.prompt_tokens,
                           "completion_tokens": r.completion_tokens, "price_per_1m": asdict(prices[r.tier])}
                  for r in runs},
        "thresholds": {"classifier": classifier.threshold, f"cascade:{cascade.check}": cascade.threshold},
        "results": _results(outcomes, paths, len(problems)),
        "seed_prices": _seed_prices(runs, paths),
        "decisions": [{"problem": p.index, "classifier": route.reason, "cascade": reason,
                       **{t: outcomes.passed[i][t] for t in tiers}}
                      for i, (p, route, (_, reason)) in enumerate(zip(problems, routes, escalations))],
    }
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json(args.json, report)}")
    if args.plot:
        print(f"wrote {plot_router(report, args.plot)}")
    return report


def _results(outcomes, paths: dict[str, list[list[str]]], n: int) -> list[dict]:
    large_q, large_c = outcomes.score(paths["large-only"])
    rows = []
    for strategy in STRATEGIES:
        q, c = outcomes.score(paths[strategy])
        rows.append({"strategy": strategy, "pass_at_1": q, "cost_usd": c, "problems": n,
                     "quality_vs_large": q / large_q if large_q else None,
                     "cost_vs_large": c / large_c if large_c else None,
                     "answered_by_large": sum(p[-1] == "large" for p in paths[strategy]) / n,
                     "paid_twice": sum(len(p) > 1 for p in paths[strategy]) / n})
    return rows


def _seed_prices(runs, paths: dict[str, list[list[str]]]) -> dict:
    """The same decisions and tokens at the seed's price table."""
    from thrifty.bench.humaneval import Outcomes

    table = {}
    for name, (small, large) in SEED_PRICES.items():
        outcomes = Outcomes.from_runs(runs, {"small": small, "large": large})
        _, large_c = outcomes.score(paths["large-only"])
        table[name] = {s: {"cost_usd": (c := outcomes.score(paths[s])[1]), "saving_vs_large": 1 - c / large_c}
                       for s in STRATEGIES}
    return table


def format_report(report: dict) -> str:
    tiers = report["tiers"]
    lines = [f"# thrifty bench router: HumanEval {report['problems']}, greedy, max_tokens {report['max_tokens']}",
             f"hardware: {report['hardware']['cpu']}, {report['hardware']['torch_threads']} threads; "
             f"machine ${report['machine_usd_per_hour']}/h", ""]
    lines.append(markdown_table(
        ["tier", "model", "prefill tok/s", "decode tok/s", "$/1M in", "$/1M out"],
        [[t, v["model"], v["prefill_tokens_per_s"], v["decode_tokens_per_s"], v["price_per_1m"]["input"],
          v["price_per_1m"]["output"]] for t, v in tiers.items()]))
    lines.append("")
    lines.append(markdown_table(
        ["strategy", "pass@1", "vs large", "cost $", "vs large", "answered by large", "paid twice"],
        [[r["strategy"], r["pass_at_1"], r["quality_vs_large"], r["cost_usd"], r["cost_vs_large"],
          r["answered_by_large"], r["paid_twice"]] for r in report["results"]]))
    lines.append("")
    seed = report["seed_prices"]
    lines.append(markdown_table(["at the seed's prices", *seed],
                                [[s, *(f"${v[s]['cost_usd']:.6f} ({v[s]['saving_vs_large']:.0%} saved)"
                                       for v in seed.values())] for s in STRATEGIES]))
    lines.append(f"thresholds: " + ", ".join(f"{k} {fmt(v)}" for k, v in report["thresholds"].items()))
    return "\n".join(lines)


def plot_router(report: dict, path: str) -> str:
    from thrifty.bench.report import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in report["results"]:
        ax.scatter(r["cost_vs_large"], r["pass_at_1"], s=60)
        ax.annotate(r["strategy"], (r["cost_vs_large"], r["pass_at_1"]), textcoords="offset points", xytext=(6, 4))
    large = next(r for r in report["results"] if r["strategy"] == "large-only")
    ax.axhline(0.95 * large["pass_at_1"], ls="--", lw=1, color="grey", label="95% of large-only pass@1")
    ax.axvline(0.70, ls=":", lw=1, color="grey", label="70% of large-only cost")
    ax.set_xlabel("cost / large-only cost")
    ax.set_ylabel("pass@1")
    ax.set_title(f"HumanEval {report['problems']}: routing strategies")
    ax.legend(loc="lower right", fontsize=8)
    return str(_save(fig, plt, path))
