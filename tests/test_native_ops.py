"""thrifty's fused CPU ops (thrifty.native) against the torch code they replace, on fresh random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thrifty import native
from thrifty.ops.attention import reference_attention
from thrifty.models.layers import RMSNorm, apply_rotary

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
DTYPES = [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)]


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("d,offset", [(896, 0.0), (100, 0.0), (64, 1.0)])
def test_rms_norm(dtype, tol, d, offset):
    g = _gen()
    norm = RMSNorm(d, 1e-6, offset)
    norm.weight.data = torch.randn(d, generator=g).to(dtype)
    x = torch.randn(5, d, generator=g).to(dtype) * 3
    assert rel(native.rms_norm(x, norm.weight, 1e-6, offset), norm.reference(x)) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,d,offset", [(1, 896, 0.0), (7, 100, 0.0), (3, 64, 1.0)])
def test_add_rms_norm_is_the_add_then_the_norm_bit_for_bit(dtype, t, d, offset):
    """The residual holds exactly torch's rounded sum, and the norm equals the native norm of that sum."""
    g = _gen()
    norm = RMSNorm(d, 1e-6, offset)
    norm.weight.data = torch.randn(d, generator=g).to(dtype)
    h, residual = (torch.randn(t, d, generator=g).to(dtype) * 3 for _ in range(2))
    want_sum = residual + h
    out = native.add_rms_norm_(h, residual, norm.weight, 1e-6, offset)
    assert torch.equal(residual, want_sum)
    assert torch.equal(out, native.rms_norm(want_sum, norm.weight, 1e-6, offset))
    assert rel(out, norm.reference(want_sum)) < (2e-6 if dtype == torch.float32 else 1e-2)


def test_add_forward_falls_back_to_torch_the_same(monkeypatch):
    g = _gen()
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64, generator=g)
    h, residual = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    fast_residual, slow_residual = residual.clone(), residual.clone()
    fast = norm.add_forward(h, fast_residual)
    monkeypatch.setattr(native, "runs", lambda t: False)
    slow = norm.add_forward(h, slow_residual)
    assert torch.equal(fast_residual, slow_residual)
    assert rel(fast, slow) < 2e-6


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("t,d", [(1, 64), (7, 64), (3, 24)])
def test_rope_in_place_on_views(dtype, tol, t, d):
    g = _gen()
    heads, kv_heads = 14, 2
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(dtype)   # q, k: strided views, as the model has
    q = qkv[:, :heads * d].view(t, heads, d)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d)
    ang = torch.randn(t, 1, d // 2, generator=g) * 3
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    ref_q, ref_k = apply_rotary(q.float(), cos.float(), sin.float()), apply_rotary(k.float(), cos.float(), sin.float())
    v_before = qkv[:, (heads + kv_heads) * d:].clone()
    native.rope_(q, k, cos, sin)
    assert rel(q, ref_q) < tol and rel(k, ref_k) < tol
    assert torch.equal(qkv[:, (heads + kv_heads) * d:], v_before)        # v untouched


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("t,n", [(1, 4864), (5, 37), (40, 256)])
def test_act_mul(dtype, tol, gelu, t, n):
    gu = (torch.randn(t, 2 * n, generator=_gen()) * 4).to(dtype)
    gate, up = gu.float()[:, :n], gu.float()[:, n:]
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    assert rel(native.act_mul(gu, gelu), act * up) < tol


def _paged(g, hkv, blocks, bs, d, lens, dtype):
    """A cache with each sequence's K/V in shuffled blocks, and the contiguous copies the reference reads."""
    k_cache = torch.zeros(hkv, blocks, bs, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(blocks, generator=g).tolist()
    nb = max(-(-n // bs) for n in lens)
    tables = torch.zeros(len(lens), nb, dtype=torch.long)
    full = []
    for s, n in enumerate(lens):
        ids = [free.pop() for _ in range(-(-n // bs))]
        tables[s, :len(ids)] = torch.tensor(ids)
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        slots = torch.tensor([ids[i // bs] * bs + i % bs for i in range(n)])
        native.kv_write_(k_cache, v_cache, k, v, slots)
        full.append((k, v))
    return k_cache, v_cache, tables, full


@pytest.mark.parametrize("q_dtype,kv_dtype,tol", [(torch.float32, torch.float32, 1e-5),
                                                   (torch.bfloat16, torch.bfloat16, 1e-2),
                                                   (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize("heads,hkv,d", [(14, 2, 64), (4, 4, 16), (16, 1, 8)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_the_contiguous_reference(q_dtype, kv_dtype, tol, heads, hkv, d, window):
    g = _gen()
    lens = [1, 9, 33, 200]
    k_cache, v_cache, tables, full = _paged(g, hkv, 80, 4, d, lens, kv_dtype)
    for s, (k, v) in enumerate(full):        # kv_write_ put every row where the table says
        slots = tables[s, torch.arange(lens[s]) // 4] * 4 + torch.arange(lens[s]) % 4
        assert torch.equal(k_cache.view(hkv, -1, d)[:, slots].transpose(0, 1), k)
        assert torch.equal(v_cache.view(hkv, -1, d)[:, slots].transpose(0, 1), v)
    q = torch.randn(len(lens), heads, d, generator=g).to(q_dtype)
    out = native.decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens), d ** -0.5, window)
    assert out.dtype == q_dtype and out.shape == q.shape
    for s, (k, v) in enumerate(full):
        ref = reference_attention(q[s:s + 1].float(), k.float(), v.float(), window=window)
        assert rel(out[s:s + 1], ref) < tol


def test_bad_inputs_are_errors_not_crashes():
    k_cache = torch.zeros(2, 4, 4, 16)
    q = torch.randn(1, 4, 16)
    with pytest.raises(RuntimeError, match="bad block id"):
        native.decode_attention(q, k_cache, k_cache.clone(), torch.tensor([[7]]), torch.tensor([3]), 0.25, None)
    with pytest.raises(RuntimeError, match="longer than its blocks"):
        native.decode_attention(q, k_cache, k_cache.clone(), torch.tensor([[0]]), torch.tensor([5]), 0.25, None)
    with pytest.raises(RuntimeError, match="slot out of range"):
        native.kv_write_(k_cache, k_cache.clone(), torch.randn(1, 2, 16), torch.randn(1, 2, 16), torch.tensor([16]))
    with pytest.raises(RuntimeError, match="float32 or bf16"):
        native.act_mul(torch.zeros(2, 8, dtype=torch.float64), False)
    with pytest.raises(RuntimeError, match="wrong size"):
        native.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        native.add_rms_norm_(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-6, 0.0)
