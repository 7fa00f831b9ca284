"""The int4 quality / speed frontier of `thrifty bench quant`, and the defaults read off it.

The rule: per method, the group size with the least perplexity loss among those whose batch-1 decode is within
`tolerance` of the fastest group's. Speed is a property of the group size (every method runs the same kernel on
the same layout), so each group's speed is the median over the methods measured at it: one noisy run does not
move the choice.
"""
from __future__ import annotations

import statistics

SPEED_TOLERANCE = 0.10


def choose_defaults(rows: list[dict], tolerance: float = SPEED_TOLERANCE) -> dict:
    """{} when the rows hold no int4 method or no bf16 reference."""
    bf16 = next((r for r in rows if r.get("format") == "bf16" and "error" not in r), None)
    int4 = [r for r in rows if r.get("method") and "error" not in r]
    if bf16 is None or not int4:
        return {}
    groups = sorted({r["group_size"] for r in int4})
    speed = {g: statistics.median(r["decode_tok_s"] for r in int4 if r["group_size"] == g) for g in groups}
    fastest = max(speed.values())
    allowed = [g for g in groups if speed[g] >= (1 - tolerance) * fastest]
    methods = {}
    for method in sorted({r["method"] for r in int4}):
        candidates = [r for r in int4 if r["method"] == method and r["group_size"] in allowed]
        if not candidates:
            continue
        best = min(candidates, key=lambda r: r["ppl"])
        methods[method] = {"group_size": best["group_size"], "ppl_vs_bf16": best["ppl"] / bf16["ppl"] - 1,
                           "kl_vs_bf16": best["kl_vs_bf16"], "decode_vs_fastest": speed[best["group_size"]] / fastest}
    return {"rule": f"least ppl loss among groups within {tolerance:.0%} of the fastest decode",
            "tolerance": tolerance, "decode_tok_s_by_group": speed, "fastest_decode_tok_s": fastest,
            "groups_within_tolerance": allowed, "methods": methods}


def format_defaults(defaults: dict) -> str:
    speeds = ", ".join(f"g{g} {v:.1f}" for g, v in defaults["decode_tok_s_by_group"].items())
    lines = [f"Defaults ({defaults['rule']}); decode tok/s by group (median over methods): {speeds}"]
    for method, d in defaults["methods"].items():
        lines.append(f"- {method}: group {d['group_size']} (ppl {d['ppl_vs_bf16']:+.2%} vs bf16, KL "
                     f"{d['kl_vs_bf16']:.4f}, decode {d['decode_vs_fastest']:.0%} of the fastest group)")
    return "\n".join(lines)
