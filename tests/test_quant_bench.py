"""`thrifty bench quant` on a tiny model: one table, JSON with the columns the issue asks for."""
from __future__ import annotations

import json

from tiny_gguf import TinySpec, write_tiny_gguf

import pytest

from thrifty.bench.quant import plan_rows
from thrifty.bench.quant_frontier import choose_defaults
from thrifty.cli import main
from thrifty.errors import InvalidRequestError


def test_bench_quant_writes_the_table_and_json(tmp_path, capsys):
    model = write_tiny_gguf(tmp_path / "t.gguf", TinySpec(hidden_size=128, intermediate_size=256))
    report = tmp_path / "q.json"
    assert main(["bench", "quant", "--model", str(model), "--formats", "bf16,int8,int4,int4-g32", "--group-sizes", "32,64",
                 "--json", str(report), "--plot", str(tmp_path / "frontier.png"),
                 "--max-eval-tokens", "128", "--seq-len", "64", "--greedy-prompts", "2", "--greedy-tokens", "3",
                 "--decode-tokens", "4", "--prefill-tokens", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| format" in out and "KL vs bf16" in out and "prefill tok/s" in out
    rows = {r["format"]: r for r in json.loads(report.read_text())["rows"]}
    assert set(rows) == {"bf16", "int8", "int4-g32", "int4-g32 RTN", "int4-g64 RTN"}
    assert (rows["int4-g64 RTN"]["method"], rows["int4-g64 RTN"]["group_size"]) == ("RTN", 64)
    assert rows["int4-g32 RTN"]["linear_weight_bytes"] > rows["int4-g64 RTN"]["linear_weight_bytes"]  # more scales
    assert (tmp_path / "frontier.png").stat().st_size > 0 and "Defaults (" in out
    for r in rows.values():
        assert {"ppl_code", "ppl_prose", "kl_vs_bf16", "linear_weight_bytes", "embedding_bytes",
                "decode_tok_s", "prefill_tok_s", "greedy_match_vs_bf16"} <= set(r)
    assert rows["bf16"]["kl_vs_bf16"] == 0 and rows["int8"]["kl_vs_bf16"] > 0
    assert rows["int4-g32"]["linear_weight_bytes"] < 0.35 * rows["bf16"]["linear_weight_bytes"]
    for r in rows.values():  # agreement with bf16 on both prompt sets (chat-templated HumanEval, raw code)
        assert 0 <= r["greedy_match_vs_bf16"] <= 1 and 0 <= r["greedy_match_vs_bf16_text"] <= 1
    assert rows["bf16"]["greedy_match_vs_bf16"] == 1 and rows["bf16"]["greedy_match_vs_bf16_text"] == 1


def _row(method: str, group: int, ppl: float, decode: float) -> dict:
    return {"format": f"int4-g{group} {method}", "method": method, "group_size": group, "ppl": ppl,
            "kl_vs_bf16": ppl - 10, "decode_tok_s": decode}


def test_defaults_take_the_least_loss_within_the_speed_tolerance():
    bf16 = {"format": "bf16", "ppl": 10.0, "decode_tok_s": 15.0}
    rows = [bf16, _row("AWQ", 32, 10.2, 40.0), _row("AWQ", 64, 10.4, 46.0), _row("AWQ", 128, 10.9, 50.0),
            _row("RTN", 32, 10.1, 41.0), _row("RTN", 64, 10.6, 45.0), _row("RTN", 128, 11.0, 50.0)]
    # per group, speed is the median over methods: g32 40.5, g64 45.5, g128 50: g64 is within 10 %, g32 not
    d = choose_defaults(rows)
    assert d["groups_within_tolerance"] == [64, 128]
    assert d["methods"]["AWQ"]["group_size"] == 64 and d["methods"]["RTN"]["group_size"] == 64
    assert d["methods"]["AWQ"]["ppl_vs_bf16"] == pytest.approx(0.04)
    loose = choose_defaults(rows, tolerance=0.3)   # g32 (40.5 >= 35) now qualifies and loses least
    assert loose["methods"]["AWQ"]["group_size"] == 32 and loose["methods"]["RTN"]["group_size"] == 32
    assert choose_defaults([bf16]) == {} and choose_defaults(rows[1:]) == {}


def test_group_sizes_are_checked():
    with pytest.raises(InvalidRequestError, match="group-sizes"):
        plan_rows("bf16,awq", "32,48", {})
    plan = plan_rows("int8,awq,llamacpp", "32,128", {})
    assert [r.label for r in plan] == ["bf16", "int8", "int4-g32 AWQ", "int4-g128 AWQ", "llama.cpp"]
