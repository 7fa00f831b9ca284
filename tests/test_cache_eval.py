"""`thrifty cache eval` end to end on a small pairs file (embedded and Redis stores), and the embedder's
parity with what sentence-transformers computes for MiniLM (transformers' BERT, mean pooling over real
tokens, L2 normalisation). Both need the real MiniLM (marked `real`)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from thrifty.cli import main

PAIRS = [
    {"a": "How do I fix a dripping tap?", "b": "okay so how do i fix a dripping tap", "should_hit": True,
     "category": "near_repeat"},
    {"a": "How do I cancel a hotel booking?", "b": "um hi how do i cancel a hotel booking", "should_hit": True},
    {"id": "n-001", "category": "negation", "a": "Cancel my subscription", "b": "Don't cancel my subscription",
     "same_answer": False},
    {"a": "Convert 100 USD to GBP", "b": "Convert 1000 USD to GBP", "should_hit": False, "category": "number_date"},
    {"a": "Does your CLI support Linux?", "b": "Does your CLI support Windows?", "should_hit": False,
     "category": "entity_swap"},
    {"a": "How do I reverse a list?", "b": "How do I reverse a list?", "should_hit": False, "category": "context",
     "context_a": "Answer with Python code.", "context_b": [{"role": "system", "content": "Answer with Rust code."}]},
    {"a": "Convert a list to a string", "b": "Convert a string to a list", "should_hit": False,
     "category": "word_order"},
]


@pytest.mark.real
@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_cache_eval_cli(tmp_path, store, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    out = tmp_path / "report.json"
    assert main(["cache", "eval", "--pairs", str(pairs), "--store", store, "--entries", "300",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["pairs"] == 7 and r["hit_rate"] == 1.0 and r["false_hit_rate"] == 0.0 and r["wrong"] == []
    assert set(r["false_hit_rate_by_category"]) == {"negation", "number_date", "entity_swap", "context", "word_order"}
    assert r["sets"][str(pairs)]["hits_by_category"]["context"] == "0/1"
    # a reason for every miss: the system prompt puts the stored question in another scope
    assert r["sets"][str(pairs)]["reasons_by_category"]["context"] == {"no entry in this scope": 1}
    assert "direction" in r["sets"][str(pairs)]["reasons_by_category"]["word_order"]
    assert r["entries_at_timing"] >= 300 and 0 < r["lookup_p50_ms"] <= r["lookup_p99_ms"]
    assert "false-hit rate" in capsys.readouterr().out


def test_load_pairs_split_field_context_and_named_sets(tmp_path):
    from thrifty.bench.cache_eval import load_pairs

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in [
        {"id": "x-001", "a": "q1", "b": "q2", "should_hit": True, "split": "tune"},   # the field wins over the id
        {"id": "x-002", "a": "q3", "b": "q4", "should_hit": False, "context_a": "Be brief."},
        {"id": "x-004", "a": "q5", "b": "q6", "should_hit": False, "split": "report"}]) + "\n")
    tune = load_pairs(f, "tune")
    assert [p["a"] for p in tune] == ["q1", "q3"]
    assert tune[1]["context_a"] == [{"role": "system", "content": "Be brief."}] and tune[1]["context_b"] == []
    assert [p["a"] for p in load_pairs(f, "report")] == ["q5"]


def test_trap_set_covers_every_kind_on_both_halves():
    from collections import Counter

    from thrifty.bench.cache_eval import load_pairs

    kinds = {"negation", "antonym", "entity_swap", "number_unit", "scope", "word_order", "symbol_name", "version",
             "code_detail", "context"}
    for half in ("tune", "report"):
        pairs = load_pairs("traps", half)
        traps = Counter(p["category"] for p in pairs if not p["should_hit"])
        assert set(traps) == kinds and min(traps.values()) >= 10, traps
        should = sum(p["should_hit"] for p in pairs)
        assert should >= 0.9 * sum(traps.values())
        assert all(p["context_a"] != p["context_b"] for p in pairs if p["category"] == "context")
    every = load_pairs("traps", "all")
    assert len({p["id"] for p in every}) == len(every) == len(load_pairs("traps", "tune")) + len(load_pairs("traps", "report"))


def test_cache_eval_bad_pairs_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x"}\n')
    assert main(["cache", "eval", "--pairs", str(bad)]) == 2
    assert "not a pair" in capsys.readouterr().err


def sentence_embeddings(folder, texts: list[str]) -> np.ndarray:
    """What sentence-transformers computes for MiniLM: BERT, mean over the real tokens, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


@pytest.mark.real
def test_embedder_matches_sentence_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from thrifty.models import zoo
    from thrifty.models.embedder import Embedder

    texts = ["How do I reset my password?", "What's the weather in Paris tomorrow?", "def add(a, b): return a + b"]
    ref = sentence_embeddings(zoo.resolve("all-minilm-l6-v2"), texts)
    fp32 = Embedder.from_zoo(precision="fp32")
    assert np.abs(fp32.embed(texts) - ref).max() < 1e-4                            # padded batch
    assert np.abs(np.stack([fp32.embed_one(t) for t in texts[::-1]])[::-1] - ref).max() < 1e-4  # one by one
    int8 = Embedder.from_zoo()  # the cache's default: dynamic int8 GEMMs
    ours = int8.embed(texts)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (ours * ref).sum(1).min() > 0.98
    # a vector never depends on the batch it was embedded in (activation scales are per text)
    int8.forget()
    assert np.array_equal(int8.embed_one(texts[1]), ours[1])
