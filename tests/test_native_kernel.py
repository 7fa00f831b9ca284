"""thrifty's few-token matmul (thrifty.native, csrc/qgemv.cpp) against a slow, obvious reference.

qgemv quantizes each 32 activations to int8 (scale = max|x| / 127, round half to even) and then computes
W x' exactly for that x'; the reference does the same in float64, so the comparison is tight. A second check
bounds the distance to the plain float product, which is what the model sees.
"""
from __future__ import annotations

import pytest
import torch

from thrifty import native
from thrifty.quant import kernels
from thrifty.quant.kernels import pack
from thrifty.quant.qtensor import QTensor, quantize_int4, quantize_int8

HAS_AVX2 = {"avx2", "fma", "f16c"} <= native._cpu_flags()
needs_kernel = pytest.mark.skipif(not HAS_AVX2, reason="qgemv needs AVX2, FMA and F16C")


def test_kernel_builds_where_the_cpu_can_run_it():
    if HAS_AVX2:
        assert native.available(), native.unavailable_reason()
    else:
        assert not native.available()


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (5, 192), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = native.pack_int4(q)
    assert packed.shape == (5, 96)
    assert torch.equal(native.unpack_int4(packed), q)
    # byte j of each 64-value block holds values j (low nibble) and j + 32 (high nibble)
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 32]) << 4


def _emulate(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """W x' in float64, x' = x quantized per 32 values as the kernel does (float32 arithmetic for the scales)."""
    m, k = x.shape
    xc = x.view(m, k // 32, 32)
    d = xc.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(xc * inv) * d
    return xq.view(m, k).double() @ w.double().t()


def _weights(bits: int, n: int, k: int, group: int, mins: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        packed = native.pack_int4(q)
    else:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int16, generator=g).to(torch.int8)   # -128 included
        packed = q
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    offs = (torch.randn(n, k // group, generator=g) * 0.1).half() if mins else None
    w = q.float().view(n, k // group, group) * scales.float()[:, :, None]
    if offs is not None:
        w = w + offs.float()[:, :, None]
    return packed, scales, offs, w.view(n, k)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,group", [(37, 128, 32), (64, 192, 64), (130, 256, 128), (9, 320, 320)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("mins", [True, False])
def test_qgemv_is_exact_for_the_activations_it_quantizes(bits, n, k, group, m, mins):
    packed, scales, offs, w = _weights(bits, n, k, group, mins, seed=n + k + m)
    for seed in range(2):                                    # fresh random inputs, one with a zero chunk
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * (1 + 3 * seed)
        if seed:
            x[0, :32] = 0
        y = native.qgemv(x, packed, scales, offs, None, bits, group)
        ref = _emulate(x, w)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6
        exact = x.double() @ w.double().t()                    # activation rounding: ~1/250 of max|x| a chunk
        assert ((y.double() - exact).norm() / exact.norm()) < 2e-2


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [5, 17])
def test_qgemv_over_several_row_blocks(bits, m):
    """Rows wide enough that qgemv walks them in several cache-sized blocks, every token tile over each block."""
    n, k, group = 37, 4096, 128
    packed, scales, offs, w = _weights(bits, n, k, group, True, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = native.qgemv(x, packed, scales, offs, None, bits, group)
    ref = _emulate(x, w)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6


HAS_VNNI = HAS_AVX2 and native.has_vnni()
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="the VNNI path needs AVX512F / BW / VL / VNNI")


@needs_vnni
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,group", [(896, 32), (896, 128), (4864, 32), (4864, 128), (640, 32), (640, 128)])
@pytest.mark.parametrize("mins", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_qgemv_vnni_path_matches_the_avx2_path_and_the_reference(bits, k, group, mins, bias):
    """Both inner loops multiply the same int8 x exactly; only the float order of the chunk products differs. Odd N,
    every tile shape (M 1..9, and 17, 33, 63, 127 with their remainders), K with a partial 256-value block (896,
    640) and without (4864)."""
    assert native.available(), native.unavailable_reason()
    n = 37
    packed, scales, offs, w = _weights(bits, n, k, group, mins, seed=k + group + bits)
    g = torch.Generator().manual_seed(k + 7 * group + bits + 2 * mins + bias)
    b = torch.randn(n, generator=g) if bias else None
    for m in (*range(1, 10), 17, 33, 63, 127):
        x = torch.randn(m, k, generator=g) * 2
        x[m // 2, 64:96] = 0                                        # a zero chunk
        avx2 = native.qgemv(x, packed, scales, offs, b, bits, group, path="avx2")
        vnni = native.qgemv(x, packed, scales, offs, b, bits, group, path="vnni")
        ref = _emulate(x, w) + (b.double() if bias else 0)
        scale = ref.abs().max()
        assert vnni.shape == (m, n) and vnni.dtype == torch.float32
        assert ((avx2.double() - ref).abs().max() / scale) < 2e-6, m
        assert ((vnni.double() - ref).abs().max() / scale) < 2e-6, m
        assert ((vnni - avx2).abs().max() / scale) < 1e-6, m   # float32 summation order only


@needs_kernel
@pytest.mark.parametrize("path", ["avx2", "vnni"])
@pytest.mark.parametrize("bits", [4, 8])
def test_qgemv_rows_are_the_same_bits_alone_and_in_a_batch(path, bits):
    """What the engine's batched == alone equivalences need: each path's y for a token does not depend on the
    tokens beside it (tile shapes, remainders, row groups)."""
    if path == "vnni" and not HAS_VNNI:
        pytest.skip("no VNNI here")
    assert native.available(), native.unavailable_reason()
    n, k, group = 45, 640, 32
    packed, scales, offs, _ = _weights(bits, n, k, group, bits == 4, seed=11)
    x = torch.randn(127, k, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    batched = native.qgemv(x, packed, scales, offs, None, bits, group, path=path)
    for m in (1, 2, 5, 9, 17, 63, 100):
        part = native.qgemv(x[:m], packed, scales, offs, None, bits, group, path=path)
        assert torch.equal(part, batched[:m]), m
    for i in (0, 8, 31, 62, 126):
        assert torch.equal(native.qgemv(x[i:i + 1], packed, scales, offs, None, bits, group, path=path)[0],
                           batched[i]), i


@needs_vnni
@pytest.mark.parametrize("bits", [4, 8])
def test_qgemv_vnni_path_in_bf16(bits):
    """bf16 activations and output: the VNNI path rounds the same sums as the AVX2 path."""
    assert native.available(), native.unavailable_reason()
    n, k, group = 70, 896, 32
    packed, scales, offs, w = _weights(bits, n, k, group, bits == 4, seed=3)
    x = torch.randn(12, k, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    avx2 = native.qgemv(x, packed, scales, offs, None, bits, group, path="avx2")
    vnni = native.qgemv(x, packed, scales, offs, None, bits, group, path="vnni")
    assert vnni.dtype == torch.bfloat16
    assert ((vnni.float() - avx2.float()).abs() <= avx2.float().abs() * 2 ** -7 + 1e-6).all()
    ref = _emulate(x.float(), w)
    assert ((vnni.double() - ref).abs().max() / ref.abs().max()) < 1e-2


def test_qgemv_path_switch(monkeypatch):
    try:
        monkeypatch.delenv("THRIFTY_QGEMV", raising=False)
        native.qgemv_path.cache_clear()
        assert native.qgemv_path() == native.QGEMV_PATHS["auto"]
        for name, mode in native.QGEMV_PATHS.items():
            monkeypatch.setenv("THRIFTY_QGEMV", name)
            native.qgemv_path.cache_clear()
            assert native.qgemv_path() == mode
        monkeypatch.setenv("THRIFTY_QGEMV", "fast")
        native.qgemv_path.cache_clear()
        with pytest.raises(ValueError, match="THRIFTY_QGEMV"):
            native.qgemv_path()
    finally:
        monkeypatch.undo()
        native.qgemv_path.cache_clear()   # later tests read the real environment again


@needs_kernel
@pytest.mark.skipif(HAS_VNNI, reason="checks the refusal on a CPU without VNNI")
def test_qgemv_refuses_the_vnni_path_without_vnni():
    assert native.available(), native.unavailable_reason()
    packed, scales, offs, _ = _weights(4, 8, 128, 32, True, 0)
    with pytest.raises(RuntimeError, match="VNNI"):
        native.qgemv(torch.randn(2, 128), packed, scales, offs, None, 4, 32, path="vnni")


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mins", [True, False])
def test_native_dequantize_matches_the_torch_formula(bits, mins):
    packed, scales, offs, w = _weights(bits, 70, 192, 64, mins, seed=bits)
    weight = kernels.NativeWeight.__new__(kernels.NativeWeight)
    torch.nn.Module.__init__(weight)
    weight.out_features, weight.in_features, weight.bits, weight.group_size = 70, 192, bits, 64
    weight.packed, weight.scales, weight.mins = packed, scales, offs
    assert torch.allclose(weight.dequantize(), weight.reference_dequantize(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(weight.dequantize(), w, rtol=1e-6, atol=1e-7)
    # bf16 straight from the kernel: the same bits as the float32 weight cast to bf16 (round to nearest even)
    assert torch.equal(weight.dequantize(torch.bfloat16), weight.dequantize().to(torch.bfloat16))


@needs_kernel
def test_qgemv_rejects_bad_shapes():
    packed, scales, offs, _ = _weights(4, 8, 128, 32, True, 0)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        native.qgemv(torch.randn(1, 96), packed[:, :48].contiguous(), scales[:, :3].contiguous(), None, None, 4, 32)
    with pytest.raises(RuntimeError, match="wrong shape"):
        native.qgemv(torch.randn(1, 128), packed[:, :32].contiguous(), scales, offs, None, 4, 32)
    with pytest.raises(RuntimeError, match="scales"):
        native.qgemv(torch.randn(1, 128), packed, scales.float(), offs, None, 4, 32)


@needs_kernel
@pytest.mark.parametrize("make", [lambda w: quantize_int4(w, 32), lambda w: quantize_int4(w, 128), quantize_int8])
def test_bf16_compute_packs_onto_qgemv_and_float32_stays_exact(make):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    qt = make(w)
    fast, exact = pack(qt, torch.bfloat16), pack(qt, torch.float32)
    assert isinstance(fast, kernels.NativeWeight) and not isinstance(exact, kernels.NativeWeight)
    assert fast.label == exact.label
    # float16 scales and mins: each term of w = q * scale + min moves by at most float16's half-ulp, 2^-11
    scale = qt.scale.repeat_interleave(qt.group_size, dim=1)
    offset = 0 if qt.offset is None else qt.offset.repeat_interleave(qt.group_size, dim=1).abs()
    bound = 2.0 ** -11 * (qt.q.float().abs() * scale + offset)
    assert ((fast.dequantize() - qt.dequantize()).abs() <= bound + 1e-9).all()
    for m in (1, 3, 33, kernels.NATIVE_DEQUANT_MIN_TOKENS):  # qgemv, and the dequantize + GEMM path
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).bfloat16()
        ref = x.float() @ qt.dequantize().t()
        assert ((fast(x, None).float() - ref).norm() / ref.norm()) < 1.5e-2


def test_scales_outside_float16_keep_the_torch_kernels():
    qt = QTensor(torch.zeros(64, 128, dtype=torch.uint8), torch.full((64, 4), 1e5), torch.zeros(64, 4), 4, 32)
    assert not isinstance(pack(qt, torch.bfloat16), kernels.NativeWeight)


@needs_kernel
def test_tiny_scales_lose_only_a_tiny_absolute_amount():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 1e-4   # scales ~1e-6: subnormal
    qt = quantize_int8(w)
    fast = pack(qt, torch.bfloat16)
    assert isinstance(fast, kernels.NativeWeight)
    assert (fast.dequantize() - qt.dequantize()).abs().max() <= 127 * 2.0 ** -25
