"""`thrifty bench serve`: the arrival process, the metric math on a stream with known timings, the ShareGPT
reader on a truncated file, the data sets, and one run against a tiny thrifty server over real HTTP."""
from __future__ import annotations

import asyncio
import json
import math
import statistics

import httpx
import pytest

from thrifty.bench import serve_client
from thrifty.bench.arrivals import arrival_times, parse_rates
from thrifty.bench.serve_data import DatasetSpec, build, load_tokenizer
from thrifty.bench.serve_metrics import RequestTiming, meets, parse_goodput, summarize
from thrifty.bench.sharegpt import first_turns, load_turns, read_array_prefix


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrivals_have_the_rate_and_the_burstiness_asked_for(burstiness):
    gaps = _gaps(arrival_times(20_001, rate=4.0, burstiness=burstiness, seed=3))
    mean = statistics.fmean(gaps)
    cv = statistics.pstdev(gaps) / mean
    assert mean == pytest.approx(0.25, rel=0.05)                  # 1 / rate
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)   # gamma shape k: CV = 1 / sqrt(k)


def test_arrivals_are_seeded_and_start_at_zero():
    a = arrival_times(50, 2.0, seed=7)
    assert a == arrival_times(50, 2.0, seed=7) != arrival_times(50, 2.0, seed=8)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    assert parse_rates("0.5, 1,inf") == [0.5, 1.0, float("inf")]
    with pytest.raises(ValueError):
        parse_rates("0,1")


class _Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def _chunk(text: str | None = None, usage: dict | None = None) -> bytes:
    data = {"choices": [{"index": 0, "delta": {"content": text} if text else {}}]} if usage is None \
        else {"choices": [], "usage": usage}
    return f"data: {json.dumps(data)}\n\n".encode()


def _fake_stream(clock: _Clock, events: list[tuple[float, bytes]]):
    async def body():
        for t, chunk in events:
            clock.t = t           # the client reads the clock after this chunk arrives
            yield chunk
        yield b"data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handler)


def test_stream_timings_give_ttft_itl_tpot(monkeypatch):
    """Sent at 10.0 s; chunks at 10.5, 10.6, 10.8 (the last carries 2 tokens); usage says 4 tokens; the stream
    ends at 10.9: TTFT 0.5, ITL 0.1 and 0.2, E2E 0.9, TPOT (0.9 - 0.5) / 3."""
    clock = _Clock()
    clock.t = 10.0
    monkeypatch.setattr(serve_client.time, "perf_counter", clock)
    events = [(10.5, _chunk("a")), (10.6, _chunk("b")), (10.7, _chunk(None)), (10.8, _chunk("cd")),
              (10.9, _chunk(usage={"prompt_tokens": 7, "completion_tokens": 4}))]

    async def run() -> RequestTiming:
        async with httpx.AsyncClient(transport=_fake_stream(clock, events)) as client:
            return await serve_client.send(client, "http://x/v1", {"model": "m"}, prompt_tokens=5)

    t = asyncio.run(run())
    assert t.ok and t.ttft == pytest.approx(0.5) and t.e2el == pytest.approx(0.9)
    assert t.itls == pytest.approx([0.1, 0.2])
    assert (t.output_tokens, t.prompt_tokens) == (4, 7)
    assert t.tpot == pytest.approx(0.4 / 3)


def test_summary_percentiles_throughput_and_goodput():
    ok = [RequestTiming(ttft=x, e2el=x + 1.0, output_tokens=11, prompt_tokens=3, itls=[0.1] * 10)
          for x in (0.5, 1.0, 1.5, 3.0)]                   # TPOT 0.1 s each
    slow = RequestTiming(ttft=0.2, e2el=5.2, output_tokens=11, prompt_tokens=3)   # TPOT 0.5 s
    failed = RequestTiming(error="HTTP 500")
    row = summarize([*ok, slow, failed], duration_s=10.0, slos=parse_goodput("ttft:2000,tpot:200"))
    assert (row["completed"], row["failed"]) == (5, 1)
    assert row["request_throughput"] == pytest.approx(0.5)
    assert row["output_throughput"] == pytest.approx(5.5)
    assert row["total_token_throughput"] == pytest.approx(7.0)
    assert row["ttft_ms"]["p50"] == pytest.approx(1000.0) and row["ttft_ms"]["mean"] == pytest.approx(1240.0)
    assert row["ttft_ms"]["p99"] == pytest.approx(3000 - 0.04 * 1500)     # linear interpolation
    assert row["tpot_ms"]["p50"] == pytest.approx(100.0) and row["itl_ms"]["p99"] == pytest.approx(100.0)
    assert row["good_requests"] == 3 and row["goodput"] == pytest.approx(0.3)   # TTFT 3 s, TPOT 0.5 s, failed
    assert row["short_outputs"] == 0
    ok[0].asked_tokens = 12                                  # it got 11: the server stopped early
    assert summarize(ok, 1.0)["short_outputs"] == 1
    assert not meets(failed, {"ttft": 1e9}) and row["errors"] == ["HTTP 500"]
    with pytest.raises(ValueError):
        parse_goodput("latency:5")


def _conversation(i: int, first: str = "human") -> dict:
    return {"id": f"c{i}", "conversations": [{"from": first, "value": f"question {i}"},
                                             {"from": "gpt" if first == "human" else "human",
                                              "value": f"answer {i}"}]}


def test_sharegpt_reader_recovers_the_whole_conversations_of_a_cut_file(tmp_path):
    convs = [_conversation(i) for i in range(4)] + [_conversation(4, first="gpt"), _conversation(5)]
    text = json.dumps(convs, indent=2)
    cut = text[: text.index('"c5"') + 30]               # inside the last conversation
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    turns, info = load_turns(path)
    assert info == {"file": "sharegpt.json", "conversations": 5, "file_complete": False, "first_turns": 4}
    assert [t.prompt for t in turns] == [f"question {i}" for i in range(4)]
    assert read_array_prefix(text) == (convs, True)
    assert read_array_prefix("[ ") == ([], False)
    assert first_turns([{"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "x"}]}]) == []


def test_datasets_build_chat_requests(tiny_gguf):
    tok = load_tokenizer(str(tiny_gguf))
    rnd, _ = build(DatasetSpec("random", 3, input_len=20, output_len=5), tok)
    assert len(rnd) == 3 and all(r.output_len == 5 and r.messages[0]["role"] == "user" for r in rnd)
    assert rnd == build(DatasetSpec("random", 3, input_len=20, output_len=5), tok)[0]   # seeded
    shared, _ = build(DatasetSpec("shared-prefix", 6, input_len=8, prefix_len=32, num_prefixes=2), tok)
    systems = [r.messages[0]["content"] for r in shared]
    assert len(set(systems)) == 2 and systems[0] == systems[2] and shared[0].prompt_tokens == 40
    he, info = build(DatasetSpec("humaneval", 2, output_len=9), tok)
    assert "def " in he[0].messages[0]["content"] and he[0].output_len == 9


def test_bench_serve_against_a_tiny_server(tmp_path, tiny_gguf, capsys):
    from thrifty.cli import main
    from thrifty.config import ServerSettings
    from thrifty.engine.async_engine import AsyncEngine
    from thrifty.engine.engine import LLMEngine
    from thrifty.server.app import create_app
    from thrifty.server.background import ServerThread

    engine = LLMEngine.from_model(str(tiny_gguf), dtype="float32", num_kv_blocks=256, block_size=16)
    with ServerThread(create_app(AsyncEngine(engine), "tiny", ServerSettings(), api_key="sk-t")) as srv:
        rc = main(["bench", "serve", "--base-url", srv.url + "/v1", "--model", "tiny", "--tokenizer", str(tiny_gguf),
                   "--api-key", "sk-t", "--dataset", "random", "--input-len", "16", "--output-len", "6",
                   "--num-prompts", "4", "--request-rate", "50,inf", "--max-concurrency", "3",
                   "--goodput", "ttft:60000,tpot:60000", "--extra-body", '{"ignore_eos": true}', "--no-progress",
                   "--json", str(tmp_path / "serve.json"), "--plot", str(tmp_path / "serve.png")])
    assert rc in (0, None)
    report = json.loads((tmp_path / "serve.json").read_text())
    assert [r["request_rate"] for r in report["results"]] == [50.0, float("inf")]
    for r in report["results"]:
        assert (r["completed"], r["failed"], r["output_tokens"], r["short_outputs"]) == (4, 0, 24, 0)
        assert r["good_requests"] == 4 and r["ttft_ms"]["p99"] >= r["ttft_ms"]["p50"] > 0
        assert r["tpot_ms"]["p50"] > 0 and r["itl_ms"]["p50"] > 0
    assert "api_key" not in report["config"] and (tmp_path / "serve.png").stat().st_size > 0
    assert "TTFT" in capsys.readouterr().out


def test_thrifty_server_variants_compose_and_write_a_valid_config(tmp_path, tiny_gguf):
    from thrifty.bench.serve import ServeConfig
    from thrifty.bench.serve_peers import thrifty_engine, thrifty_spec
    from thrifty.config import load_config
    from thrifty.errors import InvalidRequestError
    from thrifty.gateway.tiers import check_tiers

    assert thrifty_engine("thrifty") == {}
    assert thrifty_engine("thrifty+gguf+no-prefill-budget") == {"weights": "gguf", "max_decode_slowdown": None}
    assert thrifty_engine("thrifty+fast") is None and thrifty_engine("vllm") is None
    with pytest.raises(InvalidRequestError):
        ServeConfig("m", DatasetSpec("random", 1), [1.0], serve=["thrifty+fast"])
    spec = thrifty_spec("thrifty+gguf+no-prefill-budget", str(tiny_gguf), 2, 8123, tmp_path)
    config = load_config(spec.argv[-1])
    assert config.engine["weights"] == "gguf" and config.engine["max_decode_slowdown"] is None
    assert config.engine["num_threads"] == 2 and not config.cache.enabled and config.server.port == 8123
    check_tiers(config)
    assert spec.extra_body == {"ignore_eos": True}


def test_report_claims_lists_every_claim_and_keeps_to_its_budget(tmp_path, monkeypatch):
    """A zero budget runs nothing: every claim is listed with the reason it was not measured."""
    from thrifty.bench import claims

    report = claims.run_claims(0.0, tmp_path)
    assert [c["key"] for c in report["claims"]] == [c.key for c in claims.CLAIMS]
    assert all(c["status"] != "measured" and c["status"] for c in report["claims"])
    paths = claims.write(report, tmp_path)
    page = paths[0].read_text()
    assert "exact-cache" in page and "src='http" not in page and 'src="http' not in page   # self-contained
    assert json.loads(paths[2].read_text())["claims"][0]["key"] == "serving"


def test_llama_server_is_found_and_started_as_a_fair_user_would(tmp_path, monkeypatch):
    from thrifty.bench import serve_peers as peers
    from thrifty.errors import ThriftyError

    monkeypatch.setenv(peers.LLAMA_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(ThriftyError, match="not an executable"):
        peers.find_llama_server()
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv(peers.LLAMA_SERVER_ENV, str(binary))
    assert peers.find_llama_server() == binary
    spec = peers.llama_server_spec(tmp_path / "m.gguf", "m", 2, 8124, slots=4, slot_ctx=1024)
    argv = spec.argv
    assert argv[0] == str(binary) and argv[argv.index("--parallel") + 1] == "4"
    assert argv[argv.index("--ctx-size") + 1] == "4096" and "--cont-batching" in argv   # ctx is per slot x slots
    assert argv[argv.index("--threads") + 1] == argv[argv.index("--threads-batch") + 1] == "2"
    assert spec.extra_body == {"ignore_eos": True} and str(tmp_path) not in json.dumps(spec.describe)


def _row(target: str, rate: float, ttft_p99: float, goodput: float, tput: float = 10.0) -> dict:
    ms = {"mean": 1.0, "p50": 1.0, "p99": ttft_p99}
    return {"target": target, "request_rate": rate, "ttft_ms": ms, "tpot_ms": ms, "itl_ms": ms, "goodput": goodput,
            "output_throughput": tput}


def test_compare_takes_the_strongest_llamacpp_peer_and_claims_read_it():
    from thrifty.bench import claims
    from thrifty.bench.serve import compare

    served, peer = claims.SERVED, claims.PEER
    results = [_row(served, 1, 500, 0.8, 60), _row(served, 2, 900, 1.2, 90), _row(claims.BUDGETED, 2, 800, 1.0, 80),
               _row(peer, 1, 400, 0.9, 50), _row(peer, 2, 2500, 0.5, 70), _row("llamacpp", 2, 9000, 0.1)]
    report = {"results": results, "comparison": compare(results, {"ttft": 2000})}
    assert {x["peer"] for x in report["comparison"]} == {peer}
    thrifty, other, met, _ = claims._serve(report)
    assert met is False and "900" in thrifty and "2500" in other      # slower than the peer at 1 req/s
    report["results"][3] = _row(peer, 1, 600, 0.4, 50)
    report["comparison"] = compare(report["results"], {"ttft": 2000})
    assert claims._serve(report)[2] is True                             # lower at both rates, 2.4x the goodput
    thrifty, other, met, usd = claims._cost(report)
    assert thrifty.startswith(f"${claims.usd_per_1m(90):.2f}") and "saved" in usd and met is False
    assert claims.usd_per_1m(1.0) == pytest.approx(claims.USD_PER_HOUR / 3600 * 1e6)
