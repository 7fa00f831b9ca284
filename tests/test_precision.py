"""The matmul dtype rule (thrifty.ops.precision): float32 math for bf16 GEMMs on CPUs that emulate bf16."""
import pytest
import torch

from thrifty.ops import precision

CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["fast-bf16", "emulated-bf16"])
def fast(request, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: request.param)
    return request.param


def test_rule(fast):
    rows = precision.UPCAST_MIN_ROWS
    assert precision.matmul_dtype(torch.bfloat16, CPU, rows - 1) == torch.bfloat16   # matvecs stay bf16
    assert precision.matmul_dtype(torch.bfloat16, CPU, rows) == (torch.bfloat16 if fast else torch.float32)
    assert precision.matmul_dtype(torch.float32, CPU, 4096) == torch.float32
    assert precision.matmul_dtype(torch.bfloat16, torch.device("cuda"), 4096) == torch.bfloat16


@pytest.mark.parametrize("rows", [1, 7, 8, 64])
def test_linear_matches_the_dtype_it_chose(fast, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 96, generator=g).bfloat16()
    w = torch.randn(80, 96, generator=g).bfloat16()
    b = torch.randn(80, generator=g).bfloat16()
    y = precision.linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (2, rows, 80)
    dt = precision.matmul_dtype(torch.bfloat16, CPU, 2 * rows)
    expect = torch.nn.functional.linear(x.to(dt), w.to(dt), b.to(dt)).bfloat16()
    assert torch.equal(y, expect)
    # and both are the float32 product up to bf16 rounding of the result
    exact = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert torch.allclose(y.float(), exact, rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
def test_probe_agrees_with_the_cpu_flags():
    flags = set(open("/proc/cpuinfo").read().split())
    precision.cpu_has_fast_bf16.cache_clear()
    assert precision.cpu_has_fast_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
