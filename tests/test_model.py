"""The Qwen2 forward against Hugging Face transformers on tiny random models, and the attention ops
against a contiguous-cache reference on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from model_reference import SingleSequence, greedy, hf_greedy, load_hf, load_thrifty
from thrifty.ops.attention import paged_attention, reference_attention
from thrifty.ops.attention_metadata import AttentionMetadata
from thrifty.ops.forward_context import set_forward_context
from thrifty.engine.kv_cache import KVCacheSpec, PagedKVCache
from tiny_gguf import TinySpec, write_tiny_gguf


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("spec", [
    TinySpec(),
    TinySpec(tie_word_embeddings=True, attention_bias=False, num_kv_heads=1, seed=1),
    TinySpec(num_kv_heads=4, seed=2, rope_theta=1e6),
], ids=["gqa-bias-untied", "mqa-tied-nobias", "mha-theta1e6"])
def test_logits_match_transformers(tmp_path, spec):
    path = write_tiny_gguf(tmp_path / "m.gguf", spec)
    ours, config = load_thrifty(path)
    hf = load_hf(path)
    prompt = torch.randint(0, config.vocab_size, (37,), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    seq = SingleSequence(ours, config)
    got_prefill = seq.step(prompt)
    assert rel_l2(got_prefill, expected[-1]) < 1e-5
    # The same sequence fed in chunks and token by token through the paged cache.
    seq2 = SingleSequence(ours, config, seed=5)
    seq2.step(prompt[:10])
    seq2.step(prompt[10:25])
    for i in range(25, len(prompt)):
        got = seq2.step([prompt[i]])
        assert rel_l2(got, expected[i]) < 1e-5


def test_greedy_matches_transformers_generate(tiny_gguf):
    ours, config = load_thrifty(tiny_gguf)
    hf = load_hf(tiny_gguf)
    prompt = list(range(100, 130))
    assert greedy(ours, config, prompt, 24) == hf_greedy(hf, prompt, 24)
    assert greedy(ours, config, prompt, 24, chunk=7) == hf_greedy(hf, prompt, 24)


def test_bf16_stays_close_to_float32(tiny_gguf):
    ours32, config = load_thrifty(tiny_gguf, torch.float32)
    ours16, _ = load_thrifty(tiny_gguf, torch.bfloat16)
    prompt = list(range(200, 240))
    a = SingleSequence(ours32, config).step(prompt)
    b = SingleSequence(ours16, config).step(prompt)
    assert rel_l2(b, a) < 0.05


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("short_chunks", ["as-decodes", "sdpa"])
def test_paged_attention_matches_contiguous_reference(dtype, tol, window, short_chunks, monkeypatch):
    """A mixed batch (3 decodes, a fresh prefill, a chunk over a cached prefix) against per-sequence reference;
    the chunk over its prefix both ways: as decodes on the native kernel, and through SDPA over the gathered
    context."""
    from thrifty.ops import attention

    if short_chunks == "sdpa":
        monkeypatch.setattr(attention, "CHUNK_AS_DECODES", 0)
    else:
        from thrifty import native

        assert native.available(), native.unavailable_reason()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))  # fresh inputs each run
    heads, kv_heads, dim, bs = 8, 2, 16, 4
    spec = KVCacheSpec(1, kv_heads, dim, bs, 64, dtype)
    cache = PagedKVCache(spec)
    free = torch.randperm(64, generator=gen).tolist()
    # (context length before this step, new tokens this step)
    seqs = [(9, 1), (1, 1), (17, 1), (0, 11), (6, 7)]
    full_k, full_v, tables = [], [], []
    for before, new in seqs:
        total = before + new
        table = [free.pop() for _ in range(-(-total // bs))]
        tables.append(table)
        k = torch.randn(total, kv_heads, dim, generator=gen).to(dtype)
        v = torch.randn(total, kv_heads, dim, generator=gen).to(dtype)
        full_k.append(k), full_v.append(v)
        if before:  # what earlier steps wrote
            slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(before)])
            cache.layers[0].write(k[:before], v[:before], slots)
    meta = AttentionMetadata.build(tables, [b + n for b, n in seqs], [n for _, n in seqs], bs, cache.layers)
    q = torch.randn(sum(n for _, n in seqs), heads, dim, generator=gen).to(dtype)
    k_new = torch.cat([k[b:] for k, (b, _) in zip(full_k, seqs)])
    v_new = torch.cat([v[b:] for v, (b, _) in zip(full_v, seqs)])
    with set_forward_context(meta):
        out = paged_attention(q, k_new, v_new, 0, scale=dim ** -0.5, window=window)
    start = 0
    for (before, new), k, v in zip(seqs, full_k, full_v):
        ref = reference_attention(q[start:start + new], k, v, window=window)
        assert rel_l2(out[start:start + new].float(), ref) < tol
        start += new


def test_attention_outside_a_forward_context_names_the_cause():
    q = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="forward context"):
        paged_attention(q, q[:, :1], q[:, :1], 0, scale=1.0)
