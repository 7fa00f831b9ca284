"""Weight formats behind Linear: each kernel against its dequantized float reference, GGUF block decoding against
the gguf package, loading with weights=..., and the bad-input errors."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from model_reference import SingleSequence
from tiny_gguf import TinySpec, write_tiny_gguf

from thrifty.errors import InvalidRequestError, ModelFileError, UnsupportedModelError
from thrifty.models.layers import Linear, MergedLinear
from thrifty.models.loader import load
from thrifty.quant import kernels
from thrifty.models.gguf_native import decode, harmonize
from thrifty.quant.kernels import pack
from thrifty.models.quantized import formats, weight_bytes
from thrifty.quant.qtensor import QTensor, check_format, quantize_fp8, quantize_int4, quantize_int8, quantize_rtn
from thrifty.models.weight_spec import parse_weights

T = gguf.GGMLQuantizationType


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


QUANTIZERS = {
    "int8": quantize_int8,
    "int4-g32": lambda w: quantize_int4(w, 32),
    "int4-g64": lambda w: quantize_int4(w, 64),
    "int4-g128": lambda w: quantize_int4(w, 128),
    "fp8": quantize_fp8,
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, kernels.DEQUANT_MIN_TOKENS + 5])   # kernel path and unpack-then-GEMM path
def test_kernel_matches_dequantized_reference(name, dtype, m):
    n, k = 200, 256                                   # 200 rows: not a multiple of the 64-row int4 block
    qt = QUANTIZERS[name](_weight(n, k))
    packed = pack(qt, dtype, "cpu")
    bias = torch.randn(n).to(dtype)
    w_ref = qt.dequantize()
    assert torch.allclose(packed.dequantize(), w_ref, atol=2e-3 if dtype == torch.bfloat16 else 1e-6)
    for seed in range(3):                             # fresh random inputs
        x = _x(m, k, dtype, seed)
        y = packed(x, bias).float()
        ref = x.float() @ w_ref.t() + bias.float()
        tol = 2e-2 * ref.abs().max() if dtype == torch.bfloat16 else 1e-4 * ref.abs().max()
        assert y.shape == (m, n)
        assert (y - ref).abs().max() <= tol, (name, dtype, m)


def test_quantization_error_is_what_the_format_promises():
    w = _weight(256, 512)
    for name, bound in (("int8", 0.51 / 127), ("int4-g32", 0.51 / 15)):
        qt = QUANTIZERS[name](w)
        err = (qt.dequantize() - w).abs()
        # at most half a step; a step is the row (int8) or group (int4) range over the levels
        step = w.abs().amax(1, keepdim=True) * 2 if name == "int8" else \
            (w.view(256, -1, 32).amax(-1) - w.view(256, -1, 32).amin(-1)).repeat_interleave(32, 1)
        assert (err <= bound * step + 1e-7).all()


def test_int8_group_planes_are_exact_in_float32():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (96, 128), generator=g, dtype=torch.int16).to(torch.int8)
    qt = QTensor(q, torch.rand(96, 4, generator=g) * 0.01, torch.randn(96, 4, generator=g) * 0.01, 8, 32)
    packed = pack(qt, torch.float32)
    assert isinstance(packed, kernels.Int8GroupWeight)
    assert torch.allclose(packed.dequantize(), qt.dequantize(), atol=1e-7)
    x = _x(2, 128, torch.float32, 0)
    assert torch.allclose(packed(x, None), x @ qt.dequantize().t(), atol=1e-5)


def test_cpu_int4_layout_is_understood():
    # 64-row blocks with AVX-512, 32 with AVX2: the dequantized prefill path must know this machine's
    assert kernels.cpu_int4_block() in (64, 32)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1])
def test_gguf_blocks_decode_exactly(qtype):
    data = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    raw = quantize(data, qtype)
    qt = decode(raw, qtype)
    assert qt.group_size == 32 and qt.bits == (4 if qtype in (T.Q4_0, T.Q4_1) else 8)
    np.testing.assert_array_equal(qt.dequantize().numpy(), dequantize(raw, qtype))


def test_gguf_q4_k_decodes_exactly_to_int4_group_32():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (6, 2 * 144), dtype=np.uint8)      # 2 superblocks per row, random codes
    blocks = raw.reshape(6, 2, 144)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)   # d
    blocks[..., 2:4] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)  # dmin
    qt = decode(raw, T.Q4_K)
    assert (qt.bits, qt.group_size, qt.q.max().item() <= 15) == (4, 32, True)
    np.testing.assert_allclose(qt.dequantize().numpy(), dequantize(raw, T.Q4_K), rtol=0, atol=1e-6)


def test_harmonize_mixed_shards_is_exact():
    w = _weight(64, 128)
    a = quantize_int4(w[:32], 32)
    b = decode(quantize(w[32:].numpy(), T.Q8_0), T.Q8_0)
    c = quantize_int8(w[:16])
    merged = harmonize([a, b, c])
    ref = torch.cat([a.dequantize(), b.dequantize(), c.dequantize()])
    assert torch.allclose(merged.dequantize(), ref, atol=1e-7)


# ---- loading ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("q") / "t.gguf", TinySpec(hidden_size=128, intermediate_size=256))


def _logits(loaded, ids=(5, 6, 7, 8, 9, 10, 11, 12)):
    return SingleSequence(loaded.model, loaded.config).step(list(ids))


@pytest.mark.parametrize("weights,fmt,tol", [("int8", "int8", 0.05), ("int4-g128", "int4-g128", 0.4),
                                             ("int4", "int4-g32", 0.4), ("fp8", "fp8-e4m3", 0.15)])
def test_load_with_weights_runs_the_format(tiny128, weights, fmt, tol):
    """`int4` alone is the default group (32, read off the frontier in the README)."""
    ref = _logits(load(tiny128, dtype="float32"))
    loaded = load(tiny128, dtype="float32", weights=weights)
    assert formats(loaded.model) == {fmt: 9}        # lm_head auto: the untied head in the layers' format
    assert loaded.weights == weights.replace("int4", "int4-g32", weights == "int4") and loaded.lm_head == "weights"
    err = (_logits(loaded) - ref).abs().max() / ref.abs().max()
    assert err < tol
    dense = weight_bytes(load(tiny128, dtype="float32").model)["linear"]
    assert weight_bytes(loaded.model)["linear"] < dense


def test_bf16_and_fp32_weights_set_the_dtype(tiny128):
    assert load(tiny128, weights="bf16").dtype == torch.bfloat16
    assert load(tiny128, weights="fp32").dtype == torch.float32
    with pytest.raises(InvalidRequestError):
        load(tiny128, dtype="float32", weights="bf16")


def test_gguf_native_q8_0_is_lossless(tmp_path):
    path = write_tiny_gguf(tmp_path / "q8.gguf", TinySpec(hidden_size=128, intermediate_size=256,
                                                          file_type=T.Q8_0))
    ref = _logits(load(path, dtype="float32"))
    native = load(path, dtype="float32", weights="gguf")
    assert formats(native.model) == {"int8-g32": 9}
    assert torch.allclose(_logits(native), ref, atol=1e-4)


def test_gguf_native_q4_0_runs_on_int4(tmp_path):
    path = write_tiny_gguf(tmp_path / "q4.gguf", TinySpec(hidden_size=128, intermediate_size=256,
                                                          file_type=T.Q4_0))
    native = load(path, dtype="float32", weights="gguf")
    assert formats(native.model) == {"int4-g32": 9}
    assert torch.allclose(_logits(native), _logits(load(path, dtype="float32")), atol=1e-4)


def test_merged_linear_still_loads_dense_shards():
    m = MergedLinear(8, {"a": 4, "b": 2}, bias=True)
    m.load_shard("b", "weight", torch.ones(2, 8))
    assert m.weight[4:].sum() == 16
    with pytest.raises(ModelFileError, match="shard a.weight"):
        m.load_shard("a", "weight", torch.ones(3, 8))


def test_linear_staging_checks_shapes_and_missing_shards():
    m = MergedLinear(64, {"a": 32, "b": 32})
    m.expect_quantized()
    with pytest.raises(ModelFileError, match="shape"):
        m.stage("a", quantize_int8(torch.randn(16, 64)))
    m.stage("a", quantize_int8(torch.randn(32, 64)))
    with pytest.raises(ModelFileError, match="missing"):
        m.finalize(lambda parts: pack(QTensor.cat(parts), torch.float32))
    plain = Linear(64, 32)
    with pytest.raises(ValueError):
        plain.set_quantized(pack(quantize_int8(torch.randn(16, 64)), torch.float32))


@pytest.mark.parametrize("bits,group", [(3, 128), (4, 16), (4, 100), (8, 32), (5, None)])
def test_unsupported_bits_and_groups_are_typed_errors(bits, group):
    with pytest.raises(InvalidRequestError):
        check_format(bits, group)


def test_unsupported_group_for_width_and_bad_specs():
    with pytest.raises(InvalidRequestError):
        quantize_rtn(torch.randn(64, 96), 4, 64)
    for bad in ("int3", "int4-g16", "q4_k_m", "/no/such/dir"):
        with pytest.raises(InvalidRequestError):
            parse_weights(bad)
    with pytest.raises(UnsupportedModelError):
        pack(QTensor(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 2), None, 8, 16), torch.float32)


def test_gguf_weights_need_a_gguf_file(tiny128, tmp_path):
    from thrifty.models.weight_spec import resolve_weights

    with pytest.raises(InvalidRequestError, match="gguf"):
        resolve_weights(tmp_path, "gguf", "auto")
