"""`thrifty bench` on the tiny model: both commands end to end through the CLI, the JSON schema, sane numbers.

No timing thresholds: benchmarks print numbers, tests check that the numbers are there and consistent.
"""
from __future__ import annotations

import json

import pytest

from thrifty.bench.hf_peer import serial_result
from thrifty.bench.stats import percentile
from thrifty.bench.throughput import ratios
from thrifty.bench.workload import parse_range, random_requests, shared_prefix_requests, token_high
from thrifty.cli import main

ROW_KEYS = {"engine", "policy", "concurrency", "output_tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s",
            "tpot_p50_s", "tpot_p99_s", "kv_waste", "kv_waste_contiguous"}


def _throughput(tmp_path, tiny_gguf, *extra: str) -> dict:
    out = tmp_path / "tp.json"
    rc = main(["bench", "throughput", "--model", str(tiny_gguf), "--concurrency", "1,3", "--prompt-len", "8",
               "--json", str(out), "--no-progress", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_throughput_json_schema_and_sane_numbers(tmp_path, tiny_gguf, capsys):
    plot = tmp_path / "tp.png"
    extra = ["--output-len-range", "2:6", "--policies", "continuous,static,bucketed", "--requests", "4"]
    if _has_matplotlib():
        extra += ["--plot", str(plot)]
    report = _throughput(tmp_path, tiny_gguf, *extra)
    printed = capsys.readouterr().out
    assert "| engine" in printed and "| thrifty" in printed          # the markdown table
    assert {"results", "hardware", "model", "config", "date", "ratios"} <= set(report)
    assert {"cpu", "cores", "torch_threads", "torch_version"} <= set(report["hardware"])
    assert report["config"]["output_len_range"] == [2, 6]
    rows = report["results"]
    assert [(r["policy"], r["concurrency"]) for r in rows] == [
        (p, c) for p in ("continuous", "static", "bucketed") for c in (1, 3)]
    assert len({r["output_tokens"] for r in rows}) == 1                  # one seeded workload for every run
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["engine"] == "thrifty" and r["requests"] == 4
        assert 4 * 2 <= r["output_tokens"] <= 4 * 6
        assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert 0 < r["tpot_p50_s"] <= r["tpot_p99_s"]
        assert 0 <= r["kv_waste"] <= 1
        assert r["kv_waste"] <= r["kv_waste_contiguous"] <= 1     # paged never wastes more than reserving max_model_len
        assert r["extra"]["preemptions"] == 0
    names = [e["name"] for e in report["ratios"]]
    assert "thrifty continuous: c=3 / c=1" in names
    assert "thrifty continuous / static at c=3" in names
    assert all(e["value"] > 0 for e in report["ratios"])
    if _has_matplotlib():
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_with_hf_peer(tmp_path, tiny_gguf):
    pytest.importorskip("transformers")
    report = _throughput(tmp_path, tiny_gguf, "--output-len", "3", "--peers", "hf", "--hf-requests", "1")
    hf = [r for r in report["results"] if r["engine"] == "hf"]
    assert [r["concurrency"] for r in hf] == [1, 3]
    for r in hf:
        assert ROW_KEYS <= set(r)
        assert r["output_tokens"] == 3 * r["requests"] and r["output_tokens_per_s"] > 0
        assert r["kv_waste"] is None and r["ttft_p50_s"] > 0
        assert any("extrapolated" in n for n in r["notes"])       # 1 timed request stands for 2 and 6
    assert any(e["name"] == "thrifty continuous / hf at c=3" for e in report["ratios"])


def test_prefix_hits_compute_fewer_prompt_tokens(tmp_path, tiny_gguf, capsys):
    out = tmp_path / "prefix.json"
    rc = main(["bench", "prefix", "--model", str(tiny_gguf), "--shared-prefix", "64", "--suffix", "8",
               "--requests", "4", "--output-len", "2", "--json", str(out), "--no-progress"])
    assert rc == 0
    assert "prefix caching" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {"results", "hardware", "model", "config", "date", "ratios"} <= set(report)
    off, on = report["results"]
    assert (off["prefix_caching"], on["prefix_caching"]) == (False, True)
    assert off["prompt_tokens_computed"] == off["prompt_tokens"] == 4 * 72
    assert off["cached_tokens"] == 0
    assert [q["cached_tokens"] for q in on["requests"]] == [0, 64, 64, 64]       # 64 = 4 full blocks of 16
    assert [q["prompt_tokens_computed"] for q in on["requests"]] == [72, 8, 8, 8]
    assert on["prompt_tokens_computed"] < off["prompt_tokens_computed"]
    assert report["ratios"]["prompt_tokens_computed_reduction"] == pytest.approx(1 - 96 / 288)
    for mode in (off, on):
        assert all(q["ttft_s"] > 0 for q in mode["requests"])
        assert mode["ttft_cold_s"] > 0 and mode["ttft_hit_p50_s"] > 0
    assert report["ratios"]["ttft_speedup_hit_vs_cold"] > 0


@pytest.mark.parametrize("argv", [
    ["throughput", "--policies", "fastest"],
    ["throughput", "--peers", "vllm"],
    ["throughput", "--prompt-len", "600"],             # past the tiny model's 512-token context
    ["prefix", "--requests", "1"],
])
def test_bad_bench_input_is_a_clear_error(tiny_gguf, capsys, argv):
    assert main(["bench", argv[0], "--model", str(tiny_gguf), "--no-progress", *argv[1:]]) == 2
    assert "thrifty: error:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--concurrency", "a,b"], ["--output-len-range", "9:3"]])
def test_bad_bench_arguments_exit_2(tiny_gguf, argv):
    with pytest.raises(SystemExit) as e:
        main(["bench", "throughput", "--model", str(tiny_gguf), *argv])
    assert e.value.code == 2


# ---- pieces ---------------------------------------------------------------------------------------------
def test_workload_is_seeded_and_exact():
    a = random_requests(5, 16, (32, 256), high=100, seed=7)
    assert a == random_requests(5, 16, (32, 256), high=100, seed=7)
    assert a[:3] == random_requests(3, 16, (32, 256), high=100, seed=7)     # request i does not depend on n
    assert all(len(r.prompt_ids) == 16 and 32 <= r.output_len <= 256 for r in a)
    assert all(0 <= t < 100 for r in a for t in r.prompt_ids)
    prompts = shared_prefix_requests(3, 10, 4, high=50)
    assert all(p[:10] == prompts[0][:10] and len(p) == 14 for p in prompts)
    assert len({tuple(p[10:]) for p in prompts}) == 3
    assert token_high(151936, (151643, 151645)) == 151643
    assert parse_range("32:256") == (32, 256)
    with pytest.raises(ValueError):
        parse_range("256")


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(101)], 99) == pytest.approx(99.0)


def test_serial_server_replay():
    # each request: first token after 1 s, done after 5 s, 5 tokens; 4 requests, 2 clients, one server
    r = serial_result([(1.0, 5.0, 5)], num_requests=4, concurrency=2, dtype="bfloat16")
    assert r.duration_s == pytest.approx(20.0) and r.output_tokens == 20
    assert r.output_tokens_per_s == pytest.approx(1.0)
    # TTFTs: 1 (starts at once), 6 (waits for the first), then 6 each (submitted when its client's request ended)
    assert r.ttft_p50_s == pytest.approx(6.0) and r.tpot_p50_s == pytest.approx(1.0)
    alone = serial_result([(1.0, 5.0, 5)], num_requests=2, concurrency=1, dtype="bfloat16")
    assert alone.ttft_p99_s == pytest.approx(1.0)


def test_ratios_carry_the_issue_targets():
    def row(engine, policy, c, tput):
        return {"engine": engine, "policy": policy, "concurrency": c, "output_tokens_per_s": tput,
                "kv_waste": 0.01 if engine == "thrifty" else None}
    rows = [row("thrifty", "continuous", 1, 10.0), row("thrifty", "continuous", 8, 60.0),
            row("thrifty", "continuous", 32, 90.0), row("thrifty", "static", 32, 45.0),
            row("hf", "serial", 32, 10.0), row("llamacpp", "continuous", 32, 80.0)]
    got = {e["name"]: e for e in ratios(rows)}
    assert got["thrifty continuous: c=8 / c=1"]["value"] == 6.0 and got["thrifty continuous: c=8 / c=1"]["met"]
    assert got["thrifty continuous: c=32 / c=1"]["met"] is False                 # 9x < 10x
    assert got["thrifty continuous / static at c=32"]["value"] == 2.0
    assert got["thrifty continuous / hf at c=32"]["target"] == ">= 10"
    assert got["thrifty continuous / llamacpp at c=32"]["met"] is False          # 1.125x < 1.5x
    assert got["kv_waste, thrifty continuous c=1"]["met"]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_ratios_use_the_median_of_repeated_runs():
    def row(policy, tput):
        return {"engine": "thrifty", "policy": policy, "concurrency": 32, "output_tokens_per_s": tput,
                "kv_waste": None}
    rows = [row("continuous", 150.0), row("static", 100.0), row("static", 120.0), row("continuous", 90.0),
            row("continuous", 160.0), row("static", 110.0)]
    got = {e["name"]: e for e in ratios(rows)}
    assert got["thrifty continuous / static at c=32"]["value"] == 150.0 / 110.0


def test_throughput_repeats_alternate_the_policy_order(tmp_path, tiny_gguf, capsys):
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--model", str(tiny_gguf), "--concurrency", "2", "--prompt-len", "8",
                 "--output-len", "4", "--policies", "continuous,static", "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    order = [(r["policy"], r["extra"]["repeat"]) for r in report["results"]]
    assert order == [("continuous", 0), ("static", 0), ("static", 1), ("continuous", 1)]
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| engine"))
    assert [h.strip() for h in header.strip("|").split("|")][:4] == ["engine", "policy", "conc", "run"]


def test_step_bench_splits_each_step_into_its_phases(tmp_path, tiny_gguf, capsys):
    out, plot = tmp_path / "step.json", tmp_path / "step.png"
    extra = ["--plot", str(plot)] if _has_matplotlib() else []
    rc = main(["bench", "step", "--model", str(tiny_gguf), "--batch", "1,3", "--context", "12", "--steps", "4",
               "--profile-steps", "2", "--json", str(out), "--no-progress", *extra])
    assert rc == 0
    report = json.loads(out.read_text())
    assert "| batch" in capsys.readouterr().out
    assert report["measured"]["read_bandwidth_gb_s"] > 0 and report["measured"]["fp32_gemm_gmac_s"] > 0
    assert [r["batch"] for r in report["results"]] == [1, 3]
    phases = ("schedule", "inputs", "forward", "logits", "sampling", "postprocess")
    for r in report["results"]:
        assert all(r[f"{p}_ms"] >= 0 for p in phases)
        assert r["forward_ms"] > 0 and r["logits_ms"] > 0 and r["sampling_ms"] > 0
        assert sum(r[f"{p}_ms"] for p in phases) <= r["step_ms"] * 1.5     # medians of parts vs of the whole
        assert 0 < r["kernel_ms"] <= r["profiled_step_ms"]
        assert r["ops_per_step"] > 0
        # the floor: the weights (and each sequence's context) read once over the measured bandwidth
        assert r["bytes_read"] > report["model"]["linear_bytes"]
        assert r["floor_ms"] == max(r["floor_bandwidth_ms"], r["floor_compute_ms"]) > 0
    assert report["ratios"][0]["name"] == "ms per extra sequence, batch 1 -> 3"
    if _has_matplotlib():
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fairness_bench_runs_each_mode_and_answers_every_short(tmp_path, tiny_gguf, capsys):
    """The table and JSON of `bench fairness` on the tiny model: every short request gets a first token (also
    those the long prompt held up), the streams decoded during the prefill, and the modes are off + each value."""
    out = tmp_path / "fair.json"
    rc = main(["bench", "fairness", "--model", str(tiny_gguf), "--long", "400", "--short", "4", "--short-every",
               "0.01", "--streams", "2", "--slowdowns", "2,4", "--max-num-batched-tokens", "64", "--dtype", "float32",
               "--json", str(out), "--plot", str(tmp_path / "fair.png"), "--no-progress"])
    assert rc == 0
    assert "short TTFT p99 s" in capsys.readouterr().out and (tmp_path / "fair.png").stat().st_size > 0
    results = json.loads(out.read_text())["results"]
    assert [r["max_decode_slowdown"] for r in results] == [None, 2.0, 4.0]
    for r in results:
        assert r["short_requests"] >= 1 and r["short_ttft_p99_s"] > 0 and r["long_ttft_s"] > 0
        assert r["stream_tokens_during_prefill"] > 0 and r["unloaded_tpot_p50_s"] > 0


def test_determinism_bench_counts_differences_per_mode(tmp_path, tiny_gguf, capsys):
    out = tmp_path / "det.json"
    rc = main(["bench", "determinism", "--model", str(tiny_gguf), "--requests", "4", "--max-tokens", "3",
               "--dtype", "bfloat16", "--json", str(out), "--no-progress"])
    assert rc == 0 and "batched != alone" in capsys.readouterr().out
    report = json.loads(out.read_text())
    off, on = report["results"]
    assert (off["deterministic"], on["deterministic"]) == (False, True)
    assert on["differ"] == 0 and on["requests"] == 4 and on["batch_output_tok_s"] > 0
