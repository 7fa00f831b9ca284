"""Report output: markdown tables, the JSON file, PNG plots (matplotlib, Agg backend, imported only for --plot)."""
from __future__ import annotations

import json
from pathlib import Path

from thrifty.reporting import fmt, markdown_table, pyplot as _pyplot, save_figure as _save

__all__ = ["fmt", "markdown_table", "plot_fairness", "plot_prefix", "plot_quant_frontier", "plot_serve", "plot_step", "plot_throughput", "write_json"]


def write_json(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def plot_throughput(report: dict, path: str | Path) -> Path:
    """Output tokens/s and TTFT p50 against concurrency, one line per engine and policy."""
    plt = _pyplot()
    series: dict[str, list[dict]] = {}
    for r in report["results"]:
        series.setdefault(f"{r['engine']} ({r['policy']})", []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        ax1.plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", label=label)
        ax2.plot(xs, [r["ttft_p50_s"] for r in rows], marker="o", label=label)
    for ax, title, ylabel in ((ax1, "aggregate output throughput", "output tokens/s"),
                              (ax2, "time to first token (p50)", "seconds")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    c = report["config"]
    out_len = "{}-{}".format(*c["output_len_range"]) if c.get("output_len_range") else c["output_len"]
    concurrencies = sorted({r["concurrency"] for r in report["results"]})
    for ax in (ax1, ax2):
        ax.set_xticks(concurrencies, [str(x) for x in concurrencies])
        ax.minorticks_off()
    fig.suptitle(f"{report['model']['name']}: prompt {c['prompt_len']}, output {out_len}; "
                 f"{report['hardware']['cpu']}, {report['hardware']['torch_threads']} threads", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_prefix(report: dict, path: str | Path) -> Path:
    """TTFT of each request in order, with and without prefix caching."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in report["results"]:
        ttfts = [q["ttft_s"] for q in r["requests"]]
        ax.plot(range(1, len(ttfts) + 1), ttfts, marker="o",
                label="prefix caching" if r["prefix_caching"] else "no prefix caching")
    ax.set_xlabel("request (sent one after another)")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    c = report["config"]
    ax.set_title(f"{report['model']['name']}: shared prefix {c['shared_prefix']} + suffix {c['suffix']}", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_step(report: dict, path: str | Path) -> Path:
    """Milliseconds per decode step by phase (stacked), one bar per batch size, with the physical floor."""
    plt = _pyplot()
    from thrifty.engine.step_timing import PHASES

    rows = report["results"]
    labels = [str(r["batch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        values = [r[f"{phase}_ms"] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot(labels, [r["floor_ms"] for r in rows], "k_", markersize=40, mew=2, label="physical floor")
    ax.set_xlabel("sequences in the batch")
    ax.set_ylabel("ms per decode step")
    ax.set_yscale("log")
    m = report["model"]
    ax.set_title(f"{m['name']} weights={m['weights']}: decode step by phase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_quant_frontier(report: dict, path: str | Path) -> Path:
    """Perplexity loss vs bf16 against batch-1 decode speed and against weight bytes: one line per int4 method
    through its group sizes, llama.cpp's files as points."""
    plt = _pyplot()
    rows = [r for r in report["rows"] if "error" not in r]
    bf16 = next(r for r in rows if r["format"] == "bf16")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = (("decode_tok_s", "batch-1 decode tokens/s"), ("linear_weight_bytes", "linear-layer weights, MiB"))

    def loss(r: dict) -> float:
        return 100 * (r["ppl"] / bf16["ppl"] - 1)

    def x_of(r: dict, key: str) -> float:
        return r[key] / 2**20 if key.endswith("bytes") else r[key]

    for ax, (key, xlabel) in zip(axes, xs):
        for method in sorted({r["method"] for r in rows if r.get("method")}):
            line = sorted((r for r in rows if r.get("method") == method), key=lambda r: r["group_size"])
            ax.plot([x_of(r, key) for r in line], [loss(r) for r in line], marker="o", label=method)
            for r in line:
                ax.annotate(f"g{r['group_size']}", (x_of(r, key), loss(r)), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        for r in rows:
            if r["format"].startswith("llama.cpp"):
                ax.plot([x_of(r, key)], [loss(r)], marker="s", linestyle="none", label=r["weights"])
        ax.axhline(3.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity over bf16 (%)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model']}: int4 quality / speed frontier ({report['hardware']['cpu']}, "
                 f"{report['threads']} threads)", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_fairness(report: dict, path: str | Path) -> Path:
    """Per prefill-budget mode: the streams' TPOT p99 over their unloaded p50, the shorts' TTFT p99, the long
    prompt's TTFT."""
    plt = _pyplot()
    rows = report["results"]
    labels = ["off" if r["max_decode_slowdown"] is None else f"{r['max_decode_slowdown']:g}x" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    panels = (("tpot_p99_over_unloaded", "stream TPOT p99 / unloaded p50"), ("short_ttft_p99_s", "short TTFT p99 (s)"),
              ("long_ttft_s", "long prompt TTFT (s)"))
    for ax, (key, title) in zip(axes, panels):
        ax.bar(labels, [r[key] or 0.0 for r in rows])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("prefill budget (max_decode_slowdown)")
        ax.grid(True, axis="y", alpha=0.3)
    c = report["config"]
    fig.suptitle(f"{report['model']['name']} ({report['model']['weights']}): a {c['long']}-token prompt beside "
                 f"{c['streams']} streams, a {c['short']}-token request every {c['short_every_s']:g} s", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_serve(report: dict, path: str | Path) -> Path:
    """Against the request rate, one line per server: TTFT p99, TPOT p99, output tokens/s, goodput."""
    plt = _pyplot()
    series: dict[str, list[dict]] = {}
    for r in report["results"]:
        series.setdefault(r["target"], []).append(r)
    panels = (("TTFT p99 (ms)", lambda r: r["ttft_ms"]["p99"], True),
              ("TPOT p99 (ms)", lambda r: r["tpot_ms"]["p99"], True),
              ("output tokens/s", lambda r: r["output_throughput"], False),
              ("goodput (req/s)", lambda r: r.get("goodput"), False))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.8))
    for ax, (title, value, log) in zip(axes, panels):
        for name, rows in series.items():
            rows = sorted(rows, key=lambda r: r["request_rate"])
            ax.plot([r["request_rate"] for r in rows], [value(r) for r in rows], marker="o", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("request rate (req/s)")
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    c, slo = report["config"], ", ".join(f"{k}<={v:g}ms" for k, v in report["config"]["goodput"].items())
    fig.suptitle(f"{report['model']} on {report['dataset']['name']} ({c['dataset']['num_prompts']} prompts per rate,"
                 f" burstiness {c['burstiness']:g}; goodput {slo or '-'}); {report['hardware']['cpu']}, "
                 f"{c['threads']} threads per server", fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)
