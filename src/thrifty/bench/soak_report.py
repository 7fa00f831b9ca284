"""The soak's table (markdown: the checks, outcomes by kind, one row per window) and its plot over time."""
from __future__ import annotations

from pathlib import Path

from thrifty.bench.soak_mix import OUTCOMES
from thrifty.reporting import fmt, markdown_table, pyplot, save_figure


def format_report(report: dict) -> str:
    c, h, k = report["config"], report["hardware"], report["checks"]
    cal = report["calibration"]
    rate_note = (f"sustainable {cal['rate']:.3f} req/s (closed loop at {c['calibrate_concurrency']}, {cal['seconds']:.0f} s, {cal['outcomes']['rejected']} 429s) "
                 f"x {c['rate_factor']:g}" if cal else "given")
    lines = [f"## soak: {report['model']}, {report['elapsed_s'] / 60:.1f} min at {report['rate']:.3f} req/s "
             f"({rate_note}); deadline {c['deadline_s']:g} s, batch {c['max_num_seqs']}, queue {c['max_waiting']}",
             f"{h['cpu']}, {h['cores']} cores, {c['threads']} threads; {report['date']}; server alive at the end: "
             f"{fmt(report['server_alive_at_end'])}", "",
             markdown_table(["check", "met", "number"], [
                 ["no 5xx", k["no_5xx"]["ok"], k["no_5xx"]["count"]],
                 ["no lost request", k["no_lost_request"]["ok"], k["no_lost_request"]["count"]],
                 ["RSS growth after warm-up <= 5 %", k["rss_growth_after_warmup"]["ok"],
                  _pct(k["rss_growth_after_warmup"]["max_growth"]) + f" max ({_pct(k['rss_growth_after_warmup']['final_growth'])}"
                  f" at the end; warm-up peak {fmt(k['rss_growth_after_warmup']['warmup_peak_mb'])} MB)"],
                 ["p99 TTFT of admitted <= deadline", k["ttft_p99_within_deadline"]["ok"],
                  f"{fmt(k['ttft_p99_within_deadline']['ttft_p99_s'])} s of {c['deadline_s']:g} s "
                  f"({k['ttft_p99_within_deadline']['admitted']} admitted)"]]), "",
             markdown_table(["kind", *OUTCOMES], [[kind, *(row[o] for o in OUTCOMES)]
                                                  for kind, row in report["by_kind"].items()]
                            + [["all", *(report["outcomes"][o] for o in OUTCOMES)]]), "",
             "HTTP status counts: " + ", ".join(f"{s}: {n}" for s, n in report["status"].items()), "",
             markdown_table(["t min", "sent", "completed", "cancelled", "429", "refused 4xx", "other 4xx", "5xx",
                             "lost", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms", "RSS MB"],
                            [[w["t0_s"] / 60, w["sent"], w["completed"], w["cancelled"], w["rejected"], w["refused"],
                              w["client_error"], w["server_error"], w["lost"], w["ttft_p50_s"], w["ttft_p99_s"],
                              w["tpot_p50_ms"], w["tpot_p99_ms"], w["rss_mb"]] for w in report["windows"]])]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f} %"


def plot_soak(report: dict, path: str | Path) -> Path:
    """Over time: RSS, requests by outcome per window, TTFT p50/p99 against the deadline, TPOT p50/p99."""
    plt = pyplot()
    w, s = report["windows"], report["rss_samples"]
    mins = [x["t0_s"] / 60 for x in w]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    axes[0].plot([x["t"] / 60 for x in s], [x["rss_mb"] for x in s])
    axes[0].axvline(report["config"]["warmup_s"] / 60, color="gray", ls=":", label="end of warm-up")
    axes[0].set_title("server RSS (MB)", fontsize=9)
    axes[0].legend(fontsize=7)
    for outcome in ("completed", "cancelled", "rejected", "refused", "server_error", "lost"):
        axes[1].plot(mins, [x[outcome] for x in w], marker=".", label=outcome if outcome != "rejected" else "429")
    axes[1].set_title("requests per window by outcome", fontsize=9)
    axes[1].legend(fontsize=7)
    for q in ("p50", "p99"):
        axes[2].plot(mins, [x[f"ttft_{q}_s"] for x in w], marker=".", label=q)
        axes[3].plot(mins, [x[f"tpot_{q}_ms"] for x in w], marker=".", label=q)
    axes[2].axhline(report["config"]["deadline_s"], color="red", ls="--", label="deadline")
    axes[2].set_title("TTFT of streamed requests (s)", fontsize=9)
    axes[3].set_title("TPOT (ms)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("minutes")
        ax.grid(True, alpha=0.3)
    axes[2].legend(fontsize=7)
    axes[3].legend(fontsize=7)
    fig.suptitle(f"soak: {report['model']} at {report['rate']:.2f} req/s for {report['elapsed_s'] / 60:.0f} min; "
                 f"{report['hardware']['cpu']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, plt, path)
