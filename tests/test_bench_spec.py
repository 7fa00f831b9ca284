"""`thrifty bench spec` end to end on a tiny model drafting for itself: every method's outputs are plain
decoding's, the draft rows carry the cost ratio and the bound, and the report formats."""
from __future__ import annotations

import pytest

from thrifty.bench.spec import SpecBenchConfig, format_report, run_spec
from thrifty.errors import ThriftyError
from tiny_gguf import TinySpec, write_tiny_gguf


@pytest.fixture(scope="module")
def long_context_tiny(tmp_path_factory):
    return str(write_tiny_gguf(tmp_path_factory.mktemp("spec") / "tiny.gguf", TinySpec(context_length=4096)))


def test_bench_spec_with_a_draft(long_context_tiny):
    cfg = SpecBenchConfig(model=long_context_tiny, draft=long_context_tiny, workloads=["code-edit"], batch=[1],
                          requests=1, output_len=6, dtype="float32", kv_cache_memory=0.02, progress=False)
    assert cfg.methods == ["off", "ngram", "draft"]
    report = run_spec(cfg)
    rows = {r["method"]: r for r in report["results"]}
    assert all(r["identical"] for r in rows.values())
    assert rows["draft"]["num_accepted_tokens"] == rows["draft"]["num_draft_tokens"] > 0   # it is the target
    assert rows["draft"]["bound"] > 0 and report["draft_cost"]["cost_ratio"] > 0
    assert "cost ratio" in format_report(report)


def test_bench_spec_draft_with_ngram_first(long_context_tiny):
    """draft+ngram, method draft's default (n-gram lookup first): plain decoding's output, drafts proposed."""
    cfg = SpecBenchConfig(model=long_context_tiny, draft=long_context_tiny, workloads=["code-edit"], batch=[1],
                          requests=1, output_len=12, dtype="float32", kv_cache_memory=0.02, progress=False,
                          methods=["off", "draft+ngram"])
    rows = {r["method"]: r for r in run_spec(cfg)["results"]}
    assert rows["draft+ngram"]["identical"] and rows["draft+ngram"]["num_draft_tokens"] > 0
    assert "bound" not in rows["draft+ngram"]          # the bound is the draft model's alone


def test_bench_spec_methods_are_checked(long_context_tiny):
    with pytest.raises(ThriftyError, match="needs a draft"):
        SpecBenchConfig(model=long_context_tiny, methods=["off", "draft"])
    with pytest.raises(ThriftyError, match="bad methods"):
        SpecBenchConfig(model=long_context_tiny, methods=["ngram"])


def test_bench_spec_command_says_it_draws_no_plot(long_context_tiny, tmp_path, capsys):
    from thrifty.cli import main

    png = tmp_path / "spec.png"
    assert main(["bench", "spec", "--model", long_context_tiny, "--methods", "off,ngram", "--workloads", "code-edit",
                 "--batch", "1", "--requests", "2", "--output-len", "3", "--dtype", "float32", "--kv-cache-memory",
                 "0.02", "--no-progress", "--plot", str(png)]) == 0
    assert "no plot for `bench spec`" in capsys.readouterr().err and not png.exists()


def test_spec_equality_counts_identical_outputs(long_context_tiny):
    from thrifty.bench.spec_equality import format_report, run_equality

    report = run_equality(long_context_tiny, "draft", prompts=3, max_tokens=5, draft=long_context_tiny, batch=2)
    assert report["identical"] == 3 and report["differ"] == []
    assert "3 of 3" in format_report(report)


# ---- the llama-server peer (spec_peer.py), against a stand-in server that checks what it was started with ------
FAKE_LLAMA_SERVER = r'''#!{python}
"""Answers like llama-server: /v1/models, and /completion with n_predict tokens (prompt's last id + 1, + 2, ...);
with --spec-type it reports draft counters. Refuses unknown speculation flags, as the real one does."""
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

argv = sys.argv[1:]
port = int(argv[argv.index("--port") + 1])
spec = argv[argv.index("--spec-type") + 1] if "--spec-type" in argv else None
assert spec in (None, "ngram-simple", "draft-simple"), spec
if spec == "draft-simple":
    assert argv[argv.index("--model-draft") + 1].endswith(".gguf") and "--spec-draft-n-max" in argv
with open(argv[argv.index("--model") + 1] + ".argv", "a") as f:
    f.write(json.dumps(argv) + "\n")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "m"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["ignore_eos"] and body["temperature"] == 0
        n = body["n_predict"]
        tokens = [body["prompt"][-1] + i + 1 for i in range(n)]
        timings = {"draft_n": 2 * n, "draft_n_accepted": n} if spec else {}
        self._send({"tokens": tokens, "tokens_predicted": n, "timings": timings})


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def test_bench_spec_beside_llama_server(long_context_tiny, tmp_path, monkeypatch):
    import json
    import sys

    binary = tmp_path / "llama-server"
    binary.write_text(FAKE_LLAMA_SERVER.replace("{python}", sys.executable))
    binary.chmod(0o755)
    monkeypatch.setenv("THRIFTY_LLAMA_SERVER", str(binary))
    cfg = SpecBenchConfig(model=long_context_tiny, draft=long_context_tiny, workloads=["code-edit"], batch=[1, 2],
                          requests=2, output_len=5, num_tokens=3, dtype="float32", kv_cache_memory=0.02,
                          progress=False, llamacpp=True)
    report = run_spec(cfg)
    peer = report["llamacpp"]
    assert [(r["method"], r["batch"]) for r in peer] == [(m, b) for b in (1, 2) for m in ("off", "ngram", "draft")]
    assert all(r["output_tokens"] == 10 and r["identical"] for r in peer)
    assert [r["acceptance_rate"] for r in peer if r["batch"] == 1] == [None, 0.5, 0.5]
    assert len(report["vs_llamacpp"]) == 6 and all(v["ratio"] > 0 for v in report["vs_llamacpp"])
    started = [json.loads(line) for line in open(long_context_tiny + ".argv")]
    assert len(started) == 3    # one server per method, its slots the largest batch
    assert all(a[a.index("--parallel") + 1] == "2" for a in started)
    assert started[2][started[2].index("--spec-draft-n-max") + 1] == "3"
    # n-gram: num_tokens drafted after a match of thrifty's longest n-gram, cut to num_tokens (llama-server's
    # ngram-simple drafts nothing when its draft length is below its lookup length)
    assert cfg.ngram_max == 4
    assert started[1][started[1].index("--spec-ngram-simple-size-m") + 1] == "3"
    assert started[1][started[1].index("--spec-ngram-simple-size-n") + 1] == "3"
    assert "beside llama.cpp" in format_report(report)


def test_llama_server_peer_needs_gguf_files(tmp_path):
    from thrifty.bench.spec_peer import run_method

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")   # a Hugging Face folder: thrifty runs it, llama-server cannot
    with pytest.raises(ThriftyError, match="GGUF"):
        run_method(str(folder), None, "off", [("chat", 1, [[1, 2]])], 3, 4, 1)
