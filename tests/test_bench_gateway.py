"""`thrifty bench gateway` on the tiny model: the table, the JSON, every request a cache miss. The numbers are
a benchmark's business (no thresholds here)."""
from __future__ import annotations

import json

from thrifty.cli import main


def test_bench_gateway_writes_table_and_json(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "gateway.json"
    assert main(["bench", "gateway", "--model", str(tiny_gguf), "--requests", "4", "--max-tokens", "3",
                 "--dtype", "float32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "added latency" in text and "engine alone" in text and "| p50" in text
    report = json.loads(out.read_text())
    assert report["benchmark"] == "gateway" and report["config"]["requests"] == 4
    assert set(report["summary"]) == {"wall", "engine alone", "prepare", "before", "engine", "after", "added"}
    assert all(len(v) == 4 for v in report["samples_ms"].values())
    s = report["summary"]
    assert s["wall"]["p50_ms"] > 0 and s["engine"]["p50_ms"] > 0 and "cpu" in report["hardware"]
    assert all(x >= 0 for k in ("before", "after", "engine") for x in report["samples_ms"][k])
