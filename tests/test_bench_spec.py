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


def test_bench_spec_methods_are_checked(long_context_tiny):
    with pytest.raises(ThriftyError, match="needs a draft"):
        SpecBenchConfig(model=long_context_tiny, methods=["off", "draft"])
    with pytest.raises(ThriftyError, match="bad methods"):
        SpecBenchConfig(model=long_context_tiny, methods=["ngram"])


def test_spec_equality_counts_identical_outputs(long_context_tiny):
    from thrifty.bench.spec_equality import format_report, run_equality

    report = run_equality(long_context_tiny, "draft", prompts=3, max_tokens=5, draft=long_context_tiny, batch=2)
    assert report["identical"] == 3 and report["differ"] == []
    assert "3 of 3" in format_report(report)
