"""`thrifty bench quant` on a tiny model: one table, JSON with the columns the issue asks for."""
from __future__ import annotations

import json

from tiny_gguf import TinySpec, write_tiny_gguf

from thrifty.cli import main


def test_bench_quant_writes_the_table_and_json(tmp_path, capsys):
    model = write_tiny_gguf(tmp_path / "t.gguf", TinySpec(hidden_size=128, intermediate_size=256))
    report = tmp_path / "q.json"
    assert main(["bench", "quant", "--model", str(model), "--formats", "bf16,int8,int4-g32", "--json", str(report),
                 "--max-eval-tokens", "128", "--seq-len", "64", "--greedy-prompts", "2", "--greedy-tokens", "3",
                 "--decode-tokens", "4", "--prefill-tokens", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| format" in out and "KL vs bf16" in out and "prefill tok/s" in out
    rows = {r["format"]: r for r in json.loads(report.read_text())["rows"]}
    assert set(rows) == {"bf16", "int8", "int4-g32"}
    for r in rows.values():
        assert {"ppl_code", "ppl_prose", "kl_vs_bf16", "linear_weight_bytes", "embedding_bytes",
                "decode_tok_s", "prefill_tok_s", "greedy_match_vs_bf16"} <= set(r)
    assert rows["bf16"]["kl_vs_bf16"] == 0 and rows["int8"]["kl_vs_bf16"] > 0
    assert rows["int4-g32"]["linear_weight_bytes"] < 0.35 * rows["bf16"]["linear_weight_bytes"]
    for r in rows.values():  # agreement with bf16 on both prompt sets (chat-templated HumanEval, raw code)
        assert 0 <= r["greedy_match_vs_bf16"] <= 1 and 0 <= r["greedy_match_vs_bf16_text"] <= 1
    assert rows["bf16"]["greedy_match_vs_bf16"] == 1 and rows["bf16"]["greedy_match_vs_bf16_text"] == 1
