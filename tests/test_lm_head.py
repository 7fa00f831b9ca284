"""The int8 output head (`lm_head=int8`, models/quantized_head.py): its logits against the dense head within the
error its quantization allows, the tied embedding lookup from the same table, the engine's equivalences with it,
the switch in every place it is set, and the real 0.5B's logits with it."""
from __future__ import annotations

import pytest
import torch

from test_engine import mixed_prompts, run_all
from thrifty import native
from thrifty.engine.engine import EngineConfig, LLMEngine
from thrifty.errors import InvalidRequestError
from thrifty.models.loader import load
from thrifty.models.quantized import formats, weight_bytes
from thrifty.models.quantized_head import QuantEmbedding, quantize_head
from thrifty.quant import kernels
from tiny_gguf import TinySpec, write_tiny_gguf

DTYPES = ["float32", pytest.param("bfloat16", marks=pytest.mark.skipif(not native.available(),
                                                                       reason="needs thrifty's native kernels"))]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    spec = TinySpec(tie_word_embeddings=request.param, attention_bias=not request.param, seed=3)
    return write_tiny_gguf(tmp_path_factory.mktemp("head") / f"tiny-{request.param}.gguf", spec)


def _quant_activations(x: torch.Tensor) -> torch.Tensor:
    """x as qgemv multiplies it: int8 per 32 values, scale max|x| / 127."""
    m, k = x.shape
    xc = x.float().view(m, k // 32, 32)
    d = xc.abs().amax(-1, keepdim=True) / 127.0
    return (torch.round(xc / torch.where(d > 0, d, torch.ones_like(d))) * d).view(m, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_head_logits_within_the_quantization_bound(tiny, dtype):
    dense, quant = load(tiny, dtype, lm_head="dense"), load(tiny, dtype, lm_head="int8")
    head = quant.model.lm_head.qweight
    w = dense.model.lm_head.weight.double()
    wq = head.dequantize().double()
    err_w = (w - wq).abs()
    # each weight moves by at most half its group's step (max |w| / 127; the native kernel keeps it in float16)
    native_path = isinstance(head, kernels.NativeWeight)
    group = head.group_size if native_path else w.shape[1]
    step = (w.abs().view(w.shape[0], -1, group).amax(-1) / 127).repeat_interleave(group, dim=1)
    assert (err_w <= step * (0.5 + 2.0 ** -11) + 1e-12).all()
    for m in (1, 3, 17):
        x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m)).to(dense.dtype)
        ref = x.double() @ w.t()
        out = quant.model.compute_logits(x).double()
        xd = x.double()
        dx = (xd - _quant_activations(x).double()).abs() if native_path else torch.zeros_like(xd)
        bound = xd.abs() @ err_w.t() + dx @ wq.abs().t() + 2.0 ** -8 * ref.abs() + 1e-3 * (xd.abs() @ wq.abs().t())
        assert ((out - ref).abs() <= bound).all()
        assert 0 < (out - ref).norm() / ref.norm() < 2e-2      # quantized, yet close


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_table_serves_lookup_and_head_once(tiny, dtype):
    quant, dense = load(tiny, dtype, lm_head="int8"), load(tiny, dtype, lm_head="dense")
    head = quant.model.lm_head.qweight
    ids = torch.randint(0, quant.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    if not quant.config.tie_word_embeddings:
        assert isinstance(quant.model.model.embed_tokens, torch.nn.Embedding)
        assert torch.equal(quant.model.model.embed_tokens(ids), dense.model.model.embed_tokens(ids))
        return
    embed = quant.model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and embed.table is head
    rows = embed(ids)
    assert rows.shape == (2, 9, quant.config.hidden_size) and rows.dtype == quant.dtype
    assert torch.equal(rows, head.dequantize(quant.dtype)[ids])
    # one table: the bytes the model holds fall by the dense table, less the int8 one
    wb_q, wb_d = weight_bytes(quant.model), weight_bytes(dense.model)
    assert wb_q["embedding"] == 0 and wb_q["total"] == wb_d["total"] - wb_d["embedding"] + head.nbytes


def test_auto_follows_the_weights_and_dense_stays_dense(tiny):
    tied = load(tiny).config.tie_word_embeddings
    assert load(tiny, "bfloat16").lm_head == "dense"
    q = load(tiny, "bfloat16", weights="int4")
    # auto with quantized weights: a tied head int8 (one table), an untied one in the layers' format
    assert q.lm_head == ("int8" if tied else "weights")
    assert q.model.lm_head.qweight.label == ("int8-g32" if tied and native.available() else "int8" if tied
                                             else "int4-g32")
    d = load(tiny, "bfloat16", weights="int4", lm_head="dense")
    assert d.lm_head == "dense" and d.model.lm_head.weight.dtype == torch.bfloat16
    assert formats(d.model) == {"int4-g32": 2 * 4, "bfloat16": 1}
    i = load(tiny, "bfloat16", weights="int4", lm_head="int8")
    assert formats(i.model) == {"int4-g32": 2 * 4, "int8-g32" if native.available() else "int8": 1}


def test_bad_values_are_clear_errors(tiny):
    with pytest.raises(InvalidRequestError, match="lm_head"):
        EngineConfig(lm_head="int4")
    with pytest.raises(InvalidRequestError, match="lm_head"):
        load(tiny, lm_head="q6_k")
    assert EngineConfig(lm_head="INT8").lm_head == "int8"


def test_config_and_cli_carry_the_switch(tiny):
    from thrifty import LLM
    from thrifty.cli import build_parser
    from thrifty.config import ThriftyConfig

    llm = LLM(str(tiny), dtype="float32", lm_head="int8", num_kv_blocks=16, max_num_seqs=1)
    assert llm.engine.runner.model.lm_head.qweight is not None

    assert ThriftyConfig(engine={"lm_head": "int8"}).engine_config().lm_head == "int8"
    with pytest.raises(InvalidRequestError, match="lm_head"):
        ThriftyConfig(engine={"lm_head": "fp4"}).engine_config()
    parser = build_parser()
    assert parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--lm-head", "int8"]).lm_head == "int8"
    assert parser.parse_args(["bench", "step", "--model", "m", "--lm-head", "dense"]).lm_head == "dense"
    assert parser.parse_args(["serve", "--lm-head", "int8"]).lm_head == "int8"
    assert parser.parse_args(["eval", "ppl", "--model", "m"]).lm_head == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--lm-head", "int4"])


def test_bench_quant_runs_each_row_once_per_head():
    from thrifty.bench.quant import plan_rows

    rows = plan_rows("int4,llamacpp", "32", {}, "dense,int8")
    assert [r.label for r in rows] == ["bf16", "int4-g32 RTN, head dense", "int4-g32 RTN, head int8", "llama.cpp"]
    assert [r.label for r in plan_rows("int8", "32", {})] == ["bf16", "int8"]
    with pytest.raises(InvalidRequestError, match="lm_head"):
        plan_rows("int8", "32", {}, "int3")


def test_deterministic_mode_refuses_an_int8_head(tiny):
    with pytest.raises(InvalidRequestError, match="dense output head"):
        LLMEngine(load(tiny, "bfloat16", lm_head="int8"), EngineConfig(deterministic=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_logits_do_not_depend_on_the_other_rows(tiny, dtype):
    """What the engine needs of the head: a sequence's logits are the same bits alone and beside up to 63 others
    (qgemv, and torch's int8 kernel below its dequantizing row count)."""
    quant = load(tiny, dtype, lm_head="int8")
    h = torch.randn(40, quant.config.hidden_size, generator=torch.Generator().manual_seed(7)).to(quant.dtype)
    rows = min(h.shape[0], kernels.DEQUANT_MIN_TOKENS if dtype == "float32" else kernels.NATIVE_DEQUANT_MIN_TOKENS)
    batched = quant.model.compute_logits(h[:rows - 1])
    for i in (0, 5, rows - 2):
        assert torch.equal(quant.model.compute_logits(h[i:i + 1])[0], batched[i])


# ---- the engine's equivalences with the int8 head (float32: bf16 steps change tokens with the batch anyway) ------
@pytest.fixture(scope="module")
def head_alone(tiny):
    loaded = load(tiny, "float32", lm_head="int8")
    prompts = mixed_prompts(24, seed=5, shared_prefix=40)
    engine = LLMEngine(loaded, EngineConfig(dtype="float32", lm_head="int8", enable_prefix_caching=False))
    return loaded, prompts, [run_all(engine, [p])[0] for p in prompts]


@pytest.mark.parametrize("options", [
    dict(enable_prefix_caching=False),
    dict(enable_prefix_caching=True, max_num_batched_tokens=512),
    dict(max_num_batched_tokens=24),
    dict(num_kv_blocks=40, block_size=4),
], ids=["batched", "prefix-cache", "chunked", "preemption"])
def test_engine_batched_prefix_chunked_equal_alone_with_int8_head(head_alone, options):
    loaded, prompts, expected = head_alone
    engine = LLMEngine(loaded, EngineConfig(dtype="float32", lm_head="int8", **options))
    assert run_all(engine, prompts) == expected
    if options.get("num_kv_blocks"):
        assert engine.stats.preemptions > 0
    if options.get("enable_prefix_caching"):
        assert engine.block_manager.stats.hits > 0


# ---- the real model ---------------------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.skipif(not native.available(), reason="needs thrifty's native kernels")
def test_real_05b_int8_head_keeps_the_logits(qwen05_gguf):
    """int4 weights; the same hidden states through the dense bf16 head and then the int8 one on qgemv (chunks
    of up to 32 rows, as decode steps run it): the next-token choice and the distribution barely move."""
    from thrifty.bench.ppl import EvalSet
    from thrifty.ops.forward_context import set_forward_context
    from thrifty.quantizers.prefill import prefill_meta

    loaded = load(qwen05_gguf, weights="int4", lm_head="dense")
    ids = EvalSet.build(loaded.tokenizer, 256, 128).windows["code"][0]
    meta = prefill_meta(loaded.config, [len(ids)], loaded.dtype, loaded.device)
    with set_forward_context(meta):
        hidden = loaded.model(torch.tensor(ids), torch.arange(len(ids)))

    def logits() -> torch.Tensor:
        return torch.cat([loaded.model.compute_logits(hidden[i:i + 32]) for i in range(0, len(ids), 32)]).float()

    dense = logits()
    quantize_head(loaded.model, loaded.dtype, loaded.device)
    assert isinstance(loaded.model.lm_head.qweight, kernels.NativeWeight)
    quant = logits()
    agree = (dense.argmax(-1) == quant.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(quant.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert agree >= 0.95 and kl < 5e-3, (agree, kl)
